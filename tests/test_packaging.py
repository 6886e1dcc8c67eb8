"""Packaging: the systemd unit, the DaemonSet, the Containerfile and its
build script, the example configuration, and the generated configuration
reference (docs/configuration.md must equal the generator's output).

Nothing here needs root or touches the kernel. `systemd-analyze`, `hadolint`
and `shellcheck` are used when installed. The DaemonSet's field names are
checked here too; the Kubernetes schema check of every manifest, and the
agreement of the DaemonSet with the static pods, are in tests/test_manifests.py.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prism_kernel.config import FLAG_NAMES, Config, build_config

REPO = Path(__file__).resolve().parent.parent
PACKAGING = REPO / "packaging"
UNIT = PACKAGING / "prism-kernel.service"
DAEMONSET = PACKAGING / "daemonset.yaml"
CONTAINERFILE = PACKAGING / "Containerfile"
EXAMPLE_CONFIG = PACKAGING / "config.example.yaml"
CONFIG_REFERENCE = REPO / "docs" / "configuration.md"


# --------------------------------------------------------------------------
# systemd unit


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd's format: sections, keys that may repeat, comments, no continuations here."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"line continuation not expected: {raw}"
        if line.startswith("["):
            current = line.strip("[]")
            sections.setdefault(current, {})
            continue
        assert current is not None and "=" in line, raw
        key, _, value = line.partition("=")
        sections[current].setdefault(key.strip(), []).append(value.strip())
    return sections


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|min)?", value)
    assert m, value
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "min": 60, None: 1}[m.group(2)]


def test_unit_settings():
    u = parse_unit(UNIT.read_text())
    unit, service, install = u["Unit"], u["Service"], u["Install"]
    assert "kubelet.service" in " ".join(unit["Before"]).split()
    assert unit["StartLimitIntervalSec"] == ["0"]
    assert service["Restart"] == ["always"]
    assert _seconds(service["RestartSec"][0]) <= 5
    # READY=1 comes once the steering is in place, so Before=kubelet.service
    # means it; a start that never gets there fails after a bounded time and
    # is restarted (the daemon backs off by itself meanwhile).
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    assert 60 <= _seconds(service["TimeoutStartSec"][0]) <= 600
    exec_start = service["ExecStart"][0].split()
    assert exec_start[0].endswith("/prism-kernel") and exec_start[1] == "run"
    assert exec_start[2:] == ["--config", "/etc/prism-kernel/config.yaml"]
    assert "--cleanup-on-exit" not in exec_start
    # A stop never removes the data path: SIGTERM only, nothing run after it.
    assert service["KillSignal"] == ["SIGTERM"]
    for key in ("ExecStop", "ExecStopPost", "ExecReload"):
        assert key not in service, f"{key} must not be set"
    assert service["RuntimeDirectory"] == ["prism-kernel"]
    assert service["RuntimeDirectoryPreserve"] == ["yes"]
    caps = {"CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_BPF", "CAP_PERFMON"}
    assert set(service["CapabilityBoundingSet"][0].split()) == caps
    assert set(service["AmbientCapabilities"][0].split()) == caps
    # Mount-namespace sandboxing would make a bpffs the daemon mounts private
    # to the service (gone, with the steering, when it stops); and
    # ProtectKernelTunables would make /proc/sys read-only.
    for key in ("ProtectSystem", "PrivateTmp", "ProtectHome", "ProtectControlGroups", "ProtectKernelTunables",
                "ReadWritePaths", "ReadOnlyPaths", "PrivateMounts", "TemporaryFileSystem", "RootDirectory"):
        assert key not in service, f"{key} would put the service in its own mount namespace or lock /proc/sys"
    wanted_by = " ".join(install["WantedBy"]).split()
    assert "multi-user.target" in wanted_by and "kubelet.service" in wanted_by


def test_unit_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze not installed: packaging/dev.sh installs it (Debian systemd)")
    # verify checks that ExecStart= exists: point it at an installed executable.
    exe = Path(sys.executable).parent / "prism-kernel"
    if not os.access(exe, os.X_OK):
        exe = Path(shutil.which("true") or "/bin/true")
    text = UNIT.read_text().replace("/usr/local/bin/prism-kernel", str(exe))
    (tmp_path / "prism-kernel.service").write_text(text)
    # The units it is ordered against and wanted by.
    (tmp_path / "kubelet.service").write_text("[Unit]\nDescription=stand-in kubelet\n[Service]\nExecStart=/bin/true\n")
    r = subprocess.run([tool, "verify", "--man=no", str(tmp_path / "prism-kernel.service")],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    # verify exits 0 even for a setting it ignores ("Failed to parse ..."):
    # any message naming our unit counts as a failure.
    complaints = [l for l in (r.stdout + r.stderr).splitlines() if "prism-kernel.service" in l]
    assert r.returncode == 0 and complaints == [], r.stdout + r.stderr


# --------------------------------------------------------------------------
# DaemonSet

# Field names of the Kubernetes API objects the manifest uses (core/v1,
# apps/v1): a misspelt key is an error here, as it is for kubectl --validate.
POD_SPEC = {
    "activeDeadlineSeconds", "affinity", "automountServiceAccountToken", "containers", "dnsConfig", "dnsPolicy",
    "enableServiceLinks", "ephemeralContainers", "hostAliases", "hostIPC", "hostNetwork", "hostPID", "hostUsers",
    "hostname", "imagePullSecrets", "initContainers", "nodeName", "nodeSelector", "os", "overhead",
    "preemptionPolicy", "priority", "priorityClassName", "readinessGates", "resourceClaims", "resources",
    "restartPolicy", "runtimeClassName", "schedulerName", "schedulingGates", "securityContext", "serviceAccount",
    "serviceAccountName", "setHostnameAsFQDN", "shareProcessNamespace", "subdomain",
    "terminationGracePeriodSeconds", "tolerations", "topologySpreadConstraints", "volumes",
}
CONTAINER = {
    "args", "command", "env", "envFrom", "image", "imagePullPolicy", "lifecycle", "livenessProbe", "name", "ports",
    "readinessProbe", "resizePolicy", "resources", "restartPolicy", "securityContext", "startupProbe", "stdin",
    "stdinOnce", "terminationMessagePath", "terminationMessagePolicy", "tty", "volumeDevices", "volumeMounts",
    "workingDir",
}
PROBE = {"exec", "failureThreshold", "grpc", "httpGet", "initialDelaySeconds", "periodSeconds", "successThreshold",
         "tcpSocket", "terminationGracePeriodSeconds", "timeoutSeconds"}
HTTP_GET = {"host", "httpHeaders", "path", "port", "scheme"}
VOLUME_MOUNT = {"mountPath", "mountPropagation", "name", "readOnly", "recursiveReadOnly", "subPath", "subPathExpr"}
TOLERATION = {"effect", "key", "operator", "tolerationSeconds", "value"}
CONTAINER_PORT = {"containerPort", "hostIP", "hostPort", "name", "protocol"}
SECURITY_CONTEXT = {"allowPrivilegeEscalation", "appArmorProfile", "capabilities", "privileged", "procMount",
                    "readOnlyRootFilesystem", "runAsGroup", "runAsNonRoot", "runAsUser", "seLinuxOptions",
                    "seccompProfile", "windowsOptions"}
HOST_PATH_TYPES = {"", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket", "CharDevice", "BlockDevice"}


def _keys(obj: dict, allowed: set[str], what: str) -> None:
    unknown = set(obj) - allowed
    assert not unknown, f"{what}: unknown field(s) {sorted(unknown)}"


def load_manifest() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(DAEMONSET.read_text()) if d]
    by_kind = {}
    for d in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(d), d
        assert d["kind"] not in by_kind, f"two {d['kind']}s"
        by_kind[d["kind"]] = d
    assert set(by_kind) == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "DaemonSet"}
    return by_kind


def test_daemonset_structure():
    m = load_manifest()
    ds = m["DaemonSet"]
    assert ds["apiVersion"] == "apps/v1" and ds["metadata"]["namespace"] == "kube-system"
    _keys(ds["spec"], {"selector", "template", "updateStrategy", "minReadySeconds", "revisionHistoryLimit"},
          "DaemonSet.spec")
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}

    pod = ds["spec"]["template"]["spec"]
    _keys(pod, POD_SPEC, "PodSpec")
    assert pod["hostNetwork"] is True
    assert pod.get("hostPID", False) is False  # privileged gives the host cgroup namespace; no nsenter
    assert pod["dnsPolicy"] == "Default"  # never cluster DNS (it may need prism-kernel)
    assert pod["priorityClassName"] == "system-node-critical"
    assert 0 < pod["terminationGracePeriodSeconds"] <= 30
    assert pod["serviceAccountName"] == m["ServiceAccount"]["metadata"]["name"]
    tolerations = pod["tolerations"]
    for t in tolerations:
        _keys(t, TOLERATION, "toleration")
        assert t["operator"] in ("Exists", "Equal")
        assert t["effect"] in ("NoSchedule", "PreferNoSchedule", "NoExecute")
    tol = {(t["key"], t["effect"]) for t in tolerations}
    assert ("node-role.kubernetes.io/control-plane", "NoSchedule") in tol
    assert ("node.kubernetes.io/not-ready", "NoSchedule") in tol
    assert ("node.kubernetes.io/not-ready", "NoExecute") in tol

    (c,) = pod["containers"]
    _keys(c, CONTAINER, "container")
    _keys(c["securityContext"], SECURITY_CONTEXT, "securityContext")
    assert c["securityContext"]["privileged"] is True
    assert c["args"] == ["run", "--config", "/etc/prism-kernel/config.yaml"]

    volumes = {v["name"]: v for v in pod["volumes"]}
    for v in volumes.values():
        sources = set(v) - {"name"}
        assert len(sources) == 1 and sources <= {"hostPath", "configMap"}, v
        if "hostPath" in v:
            _keys(v["hostPath"], {"path", "type"}, "hostPath")
            assert v["hostPath"].get("type", "") in HOST_PATH_TYPES
    mounts = {}
    for vm in c["volumeMounts"]:
        _keys(vm, VOLUME_MOUNT, "volumeMount")
        assert vm["name"] in volumes, vm
        assert vm.get("mountPropagation", "None") in ("None", "HostToContainer", "Bidirectional")
        mounts[vm["mountPath"]] = (vm, volumes[vm["name"]])

    def host(path: str) -> tuple[dict, str]:
        vm, vol = mounts[path]
        return vm, vol["hostPath"]["path"]

    vm, src = host("/sys/fs/bpf")
    assert src == "/sys/fs/bpf" and vm["mountPropagation"] == "Bidirectional"
    vm, src = host("/sys/fs/cgroup")
    assert src == "/sys/fs/cgroup"
    vm, src = host("/run/prism-kernel")
    assert src == "/run/prism-kernel" and mounts["/run/prism-kernel"][1]["hostPath"]["type"] == "DirectoryOrCreate"
    assert not vm.get("readOnly", False)
    # No kernel headers from the node: the image loads the precompiled object.
    assert not [p for p in mounts if p.startswith(("/host", "/lib/modules", "/usr/src"))], sorted(mounts)
    vm, vol = mounts["/etc/prism-kernel"]
    assert vol["configMap"]["name"] == m["ConfigMap"]["metadata"]["name"] and vm["readOnly"] is True


def test_daemonset_probes_use_the_metrics_port():
    from prism_kernel.observe.metrics import DEFAULT_METRICS_PORT

    c = load_manifest()["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]
    for p in c["ports"]:
        _keys(p, CONTAINER_PORT, "containerPort")
    assert [p["containerPort"] for p in c["ports"]] == [DEFAULT_METRICS_PORT]
    for name, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        probe = c[name]
        _keys(probe, PROBE, name)
        _keys(probe["httpGet"], HTTP_GET, f"{name}.httpGet")
        # The metrics server listens on the node's loopback (hostNetwork);
        # kubelet's default probe host would be the node IP.
        assert probe["httpGet"] == {"host": "127.0.0.1", "path": path, "port": DEFAULT_METRICS_PORT}


def test_daemonset_rbac_reads_only_endpointslices_in_default():
    m = load_manifest()
    sa, role, binding = m["ServiceAccount"], m["Role"], m["RoleBinding"]
    assert sa["metadata"]["namespace"] == "kube-system"
    assert role["apiVersion"] == "rbac.authorization.k8s.io/v1"
    assert role["metadata"]["namespace"] == "default"
    assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                              "verbs": ["get", "list", "watch"]}]
    assert binding["metadata"]["namespace"] == "default"
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": "kube-system"}]


def _ca_file(tmp_path: Path) -> str:
    trustme = pytest.importorskip("trustme")
    path = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


def test_daemonset_config_is_valid(tmp_path):
    cm = load_manifest()["ConfigMap"]
    assert cm["metadata"]["namespace"] == "kube-system"
    data = yaml.safe_load(cm["data"]["config.yaml"])
    assert data["cleanup_on_exit"] is False
    assert data["probe"]["ca_file"] == "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    data["probe"]["ca_file"] = _ca_file(tmp_path)  # the ServiceAccount CA only exists in the pod
    config = build_config(data, {})
    assert config.port == 7445 and config.datapath == "auto"
    kubeconfig = yaml.safe_load(cm["data"]["kubeconfig"])
    cluster = kubeconfig["clusters"][0]["cluster"]
    assert cluster["tls-server-name"] == "kubernetes"
    assert kubeconfig["users"][0]["user"]["tokenFile"] == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    assert kubeconfig["current-context"] == kubeconfig["contexts"][0]["name"]


def test_example_config_is_valid(tmp_path):
    data = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    assert data["cleanup_on_exit"] is False
    data["probe"]["ca_file"] = _ca_file(tmp_path)
    build_config(data, {})


# --------------------------------------------------------------------------
# Containerfile (built and run: packaging/image.sh check, tests/test_image.py)


def containerfile_stages() -> list[list[tuple[str, str]]]:
    """The instructions of each stage (a stage starts at FROM); ARGs before
    the first FROM are stage 0's."""
    text = CONTAINERFILE.read_text().replace("\\\n", " ")
    stages: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            if word.upper() == "FROM" and stages[-1] and any(w == "FROM" for w, _ in stages[-1]):
                stages.append([])
            stages[-1].append((word.upper(), " ".join(rest.split())))
    return stages


def _installed(stage: list[tuple[str, str]]) -> set[str]:
    run = " ".join(rest for word, rest in stage if word == "RUN")
    pkgs = set()
    for m in re.finditer(r"apt-get install ((?:-\S+ )*)((?:[a-z0-9][a-z0-9.+-]* ?)+)", run):
        pkgs |= set(m.group(2).split())
    return pkgs


def test_containerfile():
    builder, final = containerfile_stages()
    assert builder[0] == ("ARG", "BASE=docker.io/library/debian:bookworm-slim")
    assert ("FROM", "${BASE} AS builder") in builder and final[0] == ("FROM", "${BASE}")
    # The builder compiles the BPF object while it builds the wheel.
    assert {"clang", "libbpf-dev", "python3-venv"} <= _installed(builder)
    builder_run = " ".join(rest for word, rest in builder if word == "RUN")
    assert "pip wheel" in builder_run and "prism_kernel/bpf/prism_sock.bpf.o" in builder_run
    # The final stage: what the daemon runs with, nothing to compile with.
    pkgs = _installed(final)
    assert {"python3", "python3-venv", "libbpf1", "nftables", "python3-nftables", "iproute2",
            "ca-certificates"} <= pkgs, pkgs
    for banned in ("clang", "gcc", "libbpf-dev", "python3-bpfcc", "bpfcc-tools", "linux-headers-amd64"):
        assert banned not in pkgs, banned
    final_run = " ".join(rest for word, rest in final if word == "RUN")
    assert "venv --system-site-packages" in final_run
    # The wheel, not an editable source tree; offline, from the builder's wheels.
    assert "pip install" in final_run and " -e " not in final_run and "--editable" not in final_run
    assert "--no-index --find-links /tmp/dist prism-kernel" in final_run
    assert ("COPY", "--from=builder /dist /tmp/dist") in final
    assert not [rest for word, rest in final if word == "COPY" and "--from=builder" not in rest], \
        "the final stage copies nothing from the source tree"
    for word, rest in builder:
        if word == "COPY":
            for src in [p for p in rest.split() if not p.startswith("--")][:-1]:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"
    import json

    entry = json.loads(next(rest for word, rest in final if word == "ENTRYPOINT"))
    cmd = json.loads(next(rest for word, rest in final if word == "CMD"))
    assert entry == ["/usr/local/bin/prism-kernel"]
    assert cmd == ["run", "--config", "/etc/prism-kernel/config.yaml"]
    # The manifests' args are the image's default command.
    ds = load_manifest()["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]
    assert ds["args"] == cmd
    hadolint = shutil.which("hadolint")
    if hadolint:
        r = subprocess.run([hadolint, str(CONTAINERFILE)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr


def test_image_script_lints():
    script = PACKAGING / "image.sh"
    assert script.stat().st_mode & stat.S_IXUSR
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck not installed: packaging/dev.sh installs it"
    r = subprocess.run([shellcheck, str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------
# configuration reference


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", PACKAGING / "gen_config_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_configuration_reference_is_up_to_date():
    gen = _generator()
    assert CONFIG_REFERENCE.read_text() == gen.render(), (
        "docs/configuration.md is out of date: run python packaging/gen_config_reference.py")


def test_configuration_reference_names_every_key_and_flag():
    text = CONFIG_REFERENCE.read_text()

    def paths(model, prefix=()):
        for name, field in model.model_fields.items():
            sub = field.annotation if isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields") else None
            yield prefix + (name,)
            if sub is not None:
                yield from paths(sub, prefix + (name,))

    for path in paths(Config):
        assert f"| `{'.'.join(path)}` |" in text, f"{'.'.join(path)} missing"
    for flag in FLAG_NAMES.values():
        assert f"`{flag}`" in text, f"{flag} missing"


def test_generator_check_mode():
    r = subprocess.run([sys.executable, str(PACKAGING / "gen_config_reference.py"), "--check"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
