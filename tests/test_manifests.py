"""The Kubernetes manifests: the DaemonSet (packaging/daemonset.yaml), the
static pod for kubeadm-style nodes (packaging/static-pod.yaml), its Talos form
(packaging/talos-static-pod.yaml: machine.pods and machine.files) and the
credential for the static pod's discovery (packaging/static-pod-rbac.yaml,
packaging/static-pod-kubeconfig.yaml).

Schema: every object is validated against the JSON schema generated from the
Kubernetes OpenAPI document of a release, in strict mode (an unknown field is
an error, as with `kubectl --validate=strict`), by kubernetes-validate (a test
dependency). kubectl itself cannot do this offline: its client-side
validation downloads /openapi/v2 from an API server, and no real OpenAPI
document is available here to serve from a fake one. The schema does not know
the API's enumerations (mountPropagation, hostPath type, ...): those are
checked against the values the API accepts below.

Agreement: the three forms run the same image, with the same arguments,
securityContext, probes, resources and mounts (the static pods add the
cluster CA, which the DaemonSet gets from its ServiceAccount); the kubeadm and
Talos pods differ only in where the configuration directory lives on the
node. Every file the daemon reads or writes in each form's configuration is
inside one of that form's mounts.

Nothing here needs root or touches the kernel.
"""

from __future__ import annotations

import copy
from pathlib import Path, PurePosixPath

import pytest
import yaml

from prism_kernel.config import build_config
from prism_kernel.observe.metrics import DEFAULT_METRICS_ADDRESS, DEFAULT_METRICS_PORT
from prism_kernel.sources.discovery import load_kubeconfig

REPO = Path(__file__).resolve().parent.parent
PACKAGING = REPO / "packaging"
DAEMONSET = PACKAGING / "daemonset.yaml"
STATIC_POD = PACKAGING / "static-pod.yaml"
TALOS = PACKAGING / "talos-static-pod.yaml"
STATIC_RBAC = PACKAGING / "static-pod-rbac.yaml"
STATIC_KUBECONFIG = PACKAGING / "static-pod-kubeconfig.yaml"
# What packaging/static-pod.yaml's header installs at /etc/prism-kernel/config.yaml.
KUBEADM_CONFIG = PACKAGING / "config.example.yaml"

# The oldest release the manifests are checked against, and the newest the
# installed kubernetes-validate knows.
OLDEST_KUBERNETES = "1.28"
# PriorityClass system-node-critical (built into every API server).
SYSTEM_NODE_CRITICAL = 2000001000
# What the ServiceAccount admission plugin gives a pod with
# automountServiceAccountToken (the DaemonSet's token, CA and namespace).
SERVICEACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
CLUSTER_CA = "/etc/kubernetes/pki/ca.crt"
CONFIG_DIR = "/etc/prism-kernel"
TALOS_CONFIG_DIR = "/var/etc/prism-kernel"


@pytest.fixture(scope="module")
def kv():
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate not installed: it is in the test extra (packaging/dev.sh installs it)")
    return kubernetes_validate


def _versions(kv) -> list[str]:
    return sorted({OLDEST_KUBERNETES, kv.utils.major_minor(kv.latest_version())})


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _by_kind(path: Path) -> dict[str, dict]:
    out = {}
    for d in _docs(path):
        assert d["kind"] not in out, f"{path.name}: two {d['kind']}s"
        out[d["kind"]] = d
    return out


def daemonset() -> dict:
    return _by_kind(DAEMONSET)["DaemonSet"]


def daemonset_pod() -> dict:
    return daemonset()["spec"]["template"]["spec"]


def static_pod() -> dict:
    (pod,) = _docs(STATIC_POD)
    return pod


def talos_patch() -> dict:
    (patch,) = _docs(TALOS)
    return patch


def talos_pod() -> dict:
    (pod,) = talos_patch()["machine"]["pods"]
    return pod


def _schema_errors(kv, obj: dict) -> list[str]:
    errors = []
    for version in _versions(kv):
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as e:
            errors.append(f"Kubernetes {version}: {'.'.join(map(str, e.path))}: {e.message}")
    return errors


# --------------------------------------------------------------------------
# schema


def _all_objects() -> list[tuple[str, dict]]:
    objs = []
    for path in (DAEMONSET, STATIC_POD, STATIC_RBAC):
        for d in _docs(path):
            objs.append((f"{path.name}:{d['kind']}", d))
    objs.append((f"{TALOS.name}:machine.pods[0]", talos_pod()))
    return objs


@pytest.mark.parametrize("name", [n for n, _ in _all_objects()])
def test_manifest_matches_the_kubernetes_schema(kv, name):
    obj = dict(_all_objects())[name]
    assert _schema_errors(kv, obj) == []


def test_the_schema_check_rejects_what_the_api_would(kv):
    """The check is strict: a misspelt field, a wrong type and a missing
    required field are each an error (a lax validator would pass anything)."""
    pod = static_pod()
    assert _schema_errors(kv, pod) == []
    misspelt = copy.deepcopy(pod)
    misspelt["spec"]["containers"][0]["volumeMounts"][0]["mountPropogation"] = "Bidirectional"
    assert any("mountPropogation" in e for e in _schema_errors(kv, misspelt))
    wrong_type = copy.deepcopy(pod)
    wrong_type["spec"]["hostNetwork"] = "yes"
    assert any("hostNetwork" in e for e in _schema_errors(kv, wrong_type))
    missing = copy.deepcopy(pod)
    del missing["spec"]["containers"][0]["name"]
    assert any("'name' is a required property" in e for e in _schema_errors(kv, missing))
    ds = copy.deepcopy(daemonset())
    ds["spec"]["template"]["spec"]["hostNetwork "] = True
    assert _schema_errors(kv, ds)


# Values the API accepts where the schema only says "string" (core/v1 validation).
ENUMS = {
    "dnsPolicy": {"ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"},
    "restartPolicy": {"Always", "OnFailure", "Never"},
    "imagePullPolicy": {"Always", "Never", "IfNotPresent"},
    "mountPropagation": {"None", "HostToContainer", "Bidirectional"},
    "hostPath.type": {"", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket", "CharDevice", "BlockDevice"},
    "protocol": {"TCP", "UDP", "SCTP"},
}


def _pod_specs() -> list[tuple[str, dict]]:
    return [("daemonset", daemonset_pod()), ("static-pod", static_pod()["spec"]),
            ("talos", talos_pod()["spec"])]


@pytest.mark.parametrize("form", ["daemonset", "static-pod", "talos"])
def test_values_the_schema_leaves_open(form):
    spec = dict(_pod_specs())[form]
    assert spec.get("dnsPolicy", "ClusterFirst") in ENUMS["dnsPolicy"]
    assert spec.get("restartPolicy", "Always") in ENUMS["restartPolicy"]
    for c in spec["containers"]:
        assert c.get("imagePullPolicy", "IfNotPresent") in ENUMS["imagePullPolicy"]
        for p in c.get("ports", []):
            assert p.get("protocol", "TCP") in ENUMS["protocol"]
        for vm in c.get("volumeMounts", []):
            assert vm.get("mountPropagation", "None") in ENUMS["mountPropagation"], vm
            # The API allows Bidirectional only in privileged containers.
            if vm.get("mountPropagation") == "Bidirectional":
                assert c["securityContext"]["privileged"] is True
        names = [v["name"] for v in spec["volumes"]]
        assert len(names) == len(set(names))
        assert {vm["name"] for vm in c["volumeMounts"]} <= set(names)
    for v in spec["volumes"]:
        if "hostPath" in v:
            assert v["hostPath"].get("type", "") in ENUMS["hostPath.type"], v


# --------------------------------------------------------------------------
# what a static pod may have


@pytest.mark.parametrize("form", ["static-pod", "talos"])
def test_static_pod_names_no_api_object(form):
    """The API refuses a mirror pod that names a ServiceAccount, Secret or
    ConfigMap, and kubelet must start the pod before the API answers."""
    pod = static_pod() if form == "static-pod" else talos_pod()
    assert pod["apiVersion"] == "v1" and pod["kind"] == "Pod"
    assert pod["metadata"]["namespace"] == "kube-system"
    spec = pod["spec"]
    assert "serviceAccountName" not in spec and "serviceAccount" not in spec
    assert spec["automountServiceAccountToken"] is False
    assert "imagePullSecrets" not in spec
    for key in ("nodeName", "nodeSelector", "affinity", "tolerations", "schedulerName"):
        assert key not in spec, f"{key}: a static pod is not scheduled"
    for v in spec["volumes"]:
        assert set(v) - {"name"} <= {"hostPath", "emptyDir"}, v
    for c in spec["containers"]:
        assert "envFrom" not in c
        for e in c.get("env", []):
            assert "valueFrom" not in e or set(e["valueFrom"]) <= {"fieldRef", "resourceFieldRef"}, e
    # kubelet does not resolve the class of a pod read from a file: the value is
    # set, and must be the class's, or the API refuses the mirror pod.
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["priority"] == SYSTEM_NODE_CRITICAL


# --------------------------------------------------------------------------
# agreement


def _container(spec: dict) -> dict:
    (c,) = spec["containers"]
    return c


def test_kubeadm_and_talos_static_pods_are_the_same_pod():
    """Only the configuration directory's place on the node differs (Talos
    creates files only under /var)."""
    kubeadm, talos = static_pod(), talos_pod()
    k_vols = {v["name"]: v for v in kubeadm["spec"]["volumes"]}
    t_vols = {v["name"]: v for v in talos["spec"]["volumes"]}
    assert k_vols["config"]["hostPath"] == {"path": CONFIG_DIR, "type": "Directory"}
    assert t_vols["config"]["hostPath"] == {"path": TALOS_CONFIG_DIR}
    t = copy.deepcopy(talos)
    for v in t["spec"]["volumes"]:
        if v["name"] == "config":
            v["hostPath"] = copy.deepcopy(k_vols["config"]["hostPath"])
    assert t == kubeadm


def test_static_pod_agrees_with_the_daemonset():
    ds, sp = daemonset_pod(), static_pod()["spec"]
    # Pod level.
    for key in ("hostNetwork", "dnsPolicy", "priorityClassName", "terminationGracePeriodSeconds", "hostPID"):
        assert sp.get(key) == ds.get(key), key
    assert sp["hostNetwork"] is True and "hostPID" not in sp
    # The container: everything but the mounts is identical.
    dc, sc = _container(ds), _container(sp)
    assert set(dc) == set(sc)
    for key in dc:
        if key != "volumeMounts":
            assert sc[key] == dc[key], key
    assert sc["image"] == dc["image"]
    assert sc["args"] == ["run", "--config", f"{CONFIG_DIR}/config.yaml"]
    assert sc["securityContext"] == {"privileged": True}
    # Mounts: the same paths with the same options; the static pod adds the
    # cluster CA (the DaemonSet's comes with its ServiceAccount token).
    d_mounts = {m["mountPath"]: m for m in dc["volumeMounts"]}
    s_mounts = {m["mountPath"]: m for m in sc["volumeMounts"]}
    assert set(s_mounts) - set(d_mounts) == {CLUSTER_CA}
    assert set(d_mounts) <= set(s_mounts)
    for path, m in d_mounts.items():
        assert s_mounts[path] == m, path
    assert s_mounts[CLUSTER_CA]["readOnly"] is True
    # Volumes behind them: the same host paths and types, but the configuration.
    d_vols = {v["name"]: v for v in ds["volumes"]}
    s_vols = {v["name"]: v for v in sp["volumes"]}
    for path, m in d_mounts.items():
        if path == CONFIG_DIR:
            assert "configMap" in d_vols[m["name"]] and "hostPath" in s_vols[m["name"]]
            continue
        assert s_vols[m["name"]] == d_vols[m["name"]], path
    assert s_vols["cluster-ca"]["hostPath"] == {"path": CLUSTER_CA, "type": "File"}
    # The mounts that keep the steering alive across pod restarts.
    assert d_mounts["/sys/fs/bpf"]["mountPropagation"] == "Bidirectional"
    assert d_vols["bpffs"]["hostPath"]["path"] == "/sys/fs/bpf"
    assert d_mounts["/sys/fs/cgroup"]["mountPropagation"] == "HostToContainer"
    assert d_vols["run"]["hostPath"]["path"] == "/run/prism-kernel"


@pytest.mark.parametrize("form", ["daemonset", "static-pod", "talos"])
def test_probes_reach_the_metrics_server(form):
    """With hostNetwork the probes go to the node's loopback, where the
    daemon's /healthz and /readyz listen by default."""
    spec = dict(_pod_specs())[form]
    assert spec["hostNetwork"] is True
    c = _container(spec)
    assert [p["containerPort"] for p in c["ports"]] == [DEFAULT_METRICS_PORT]
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert c[probe]["httpGet"] == {"host": DEFAULT_METRICS_ADDRESS, "path": path, "port": DEFAULT_METRICS_PORT}
        assert c[probe]["periodSeconds"] * c[probe]["failureThreshold"] >= 10


# --------------------------------------------------------------------------
# each form's configuration, and the files it names


def _talos_files() -> dict[str, dict]:
    return {f["path"]: f for f in talos_patch()["machine"]["files"]}


def _talos_file(container_path: str) -> str:
    return _talos_files()[TALOS_CONFIG_DIR + container_path[len(CONFIG_DIR):]]["content"]


def _form_config(form: str) -> tuple[dict, dict | None]:
    """(config.yaml, the kubeconfig discovery reads) of a form, as the daemon sees them."""
    if form == "daemonset":
        cm = _by_kind(DAEMONSET)["ConfigMap"]["data"]
        return yaml.safe_load(cm["config.yaml"]), yaml.safe_load(cm["kubeconfig"])
    if form == "static-pod":
        return yaml.safe_load(KUBEADM_CONFIG.read_text()), yaml.safe_load(STATIC_KUBECONFIG.read_text())
    config = yaml.safe_load(_talos_file(f"{CONFIG_DIR}/config.yaml"))
    return config, yaml.safe_load(_talos_file(f"{CONFIG_DIR}/kubeconfig"))


def _mounts(spec: dict) -> dict[str, dict]:
    c = _container(spec)
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    if spec.get("automountServiceAccountToken"):
        mounts[SERVICEACCOUNT_DIR] = {"mountPath": SERVICEACCOUNT_DIR, "readOnly": True}
    return mounts


def _mount_of(mounts: dict[str, dict], path: str) -> dict | None:
    p = PurePosixPath(path)
    for mp, m in mounts.items():
        if p == PurePosixPath(mp) or PurePosixPath(mp) in p.parents:
            return m
    return None


@pytest.mark.parametrize("form", ["daemonset", "static-pod", "talos"])
def test_every_file_the_daemon_uses_is_mounted(form):
    spec = dict(_pod_specs())[form]
    mounts = _mounts(spec)
    config, kubeconfig = _form_config(form)
    args = _container(spec)["args"]
    reads = [args[args.index("--config") + 1], config["probe"]["ca_file"]]
    reads += [config["probe"][k] for k in ("client_cert_file", "client_key_file") if config["probe"].get(k)]
    writes = [config.get("run_dir") or "/run/prism-kernel", "/sys/fs/bpf"]
    discovery = config.get("discovery") or {}
    if discovery.get("enabled") or form != "static-pod":
        reads.append(discovery["kubeconfig"])
        writes.append(discovery.get("cache_file") or "/var/lib/prism-kernel/discovered-endpoints.json")
        cluster = kubeconfig["clusters"][0]["cluster"]
        user = kubeconfig["users"][0]["user"]
        reads.append(cluster["certificate-authority"])
        reads += [user[k] for k in ("tokenFile", "client-certificate", "client-key") if k in user]
    for path in reads:
        assert _mount_of(mounts, path) is not None, f"{form}: {path} is in no mount"
    for path in writes:
        m = _mount_of(mounts, path)
        assert m is not None and not m.get("readOnly", False), f"{form}: {path} is not writable"


@pytest.mark.parametrize("form", ["daemonset", "static-pod", "talos"])
def test_each_forms_configuration_is_valid(form, tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    config, _ = _form_config(form)
    assert config["cleanup_on_exit"] is False  # a pod restart must not cut the node's API access
    assert config.get("port", 7445) == 7445
    config["probe"]["ca_file"] = str(ca)  # the node's CA exists only on a node
    build_config(config, {})
    if "discovery" in config:
        config["discovery"]["enabled"] = True
        build_config(config, {})


def test_talos_machine_files():
    files = talos_patch()["machine"]["files"]
    for f in files:
        assert set(f) <= {"content", "permissions", "path", "op"} and {"content", "path", "op"} <= set(f), f
        assert f["op"] in ("create", "append", "overwrite")
        # Talos creates files only under /var (anything else fails the boot).
        assert PurePosixPath(f["path"]).parents[-2] == PurePosixPath("/var"), f["path"]
        # 0o644 as Talos writes it (YAML 1.2 octal; PyYAML reads it as a string).
        perm = f["permissions"]
        perm = int(perm, 8) if isinstance(perm, str) else perm
        assert perm & 0o022 == 0, f"{f['path']}: writable by others"
    # Every file lands in the pod's configuration directory, where args point.
    config_vol = next(v for v in talos_pod()["spec"]["volumes"] if v["name"] == "config")
    assert {str(PurePosixPath(f["path"]).parent) for f in files} == {config_vol["hostPath"]["path"]}
    assert f"{TALOS_CONFIG_DIR}/config.yaml" in _talos_files()
    assert set(talos_patch()) == {"machine"} and set(talos_patch()["machine"]) == {"pods", "files"}


def test_static_pod_kubeconfig(tmp_path):
    """The kubeconfig the Talos form writes is packaging/static-pod-kubeconfig.yaml,
    and it loads: CA, token file, the name to verify."""
    shipped = yaml.safe_load(STATIC_KUBECONFIG.read_text())
    assert yaml.safe_load(_talos_file(f"{CONFIG_DIR}/kubeconfig")) == shipped
    cluster = shipped["clusters"][0]["cluster"]
    assert cluster["certificate-authority"] == CLUSTER_CA
    assert shipped["users"][0]["user"] == {"tokenFile": f"{CONFIG_DIR}/token"}
    trustme = pytest.importorskip("trustme")
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.crt"))
    (tmp_path / "token").write_text("a-token\n")
    text = STATIC_KUBECONFIG.read_text().replace(CLUSTER_CA, str(tmp_path / "ca.crt"))
    text = text.replace(f"{CONFIG_DIR}/token", str(tmp_path / "token"))
    (tmp_path / "kubeconfig").write_text(text)
    creds = load_kubeconfig(tmp_path / "kubeconfig")
    assert creds.token_file == str(tmp_path / "token")
    assert creds.tls_server_name == "kubernetes"
    assert creds.authorization() == "Bearer a-token"


def test_static_pod_credential_is_the_daemonsets_role():
    ds, static = _by_kind(DAEMONSET), _by_kind(STATIC_RBAC)
    assert set(static) == {"ServiceAccount", "Role", "RoleBinding", "Secret"}
    for kind in ("ServiceAccount", "Role", "RoleBinding"):
        assert static[kind] == ds[kind], kind
    secret, sa = static["Secret"], static["ServiceAccount"]
    assert secret["type"] == "kubernetes.io/service-account-token"
    assert secret["metadata"]["namespace"] == sa["metadata"]["namespace"]
    assert secret["metadata"]["annotations"] == {"kubernetes.io/service-account.name": sa["metadata"]["name"]}
    assert "data" not in secret and "stringData" not in secret  # the token controller fills it
