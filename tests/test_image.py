"""The container image, run as the DaemonSet and the static pods run it: host
network, privileged, the host's cgroup namespace, the host's bpffs with
Bidirectional (rshared) propagation, the cgroup root with HostToContainer
(rslave, read-only), the run directory from the host, the configuration as a
read-only directory at /etc/prism-kernel and the default arguments
(`run --config /etc/prism-kernel/config.yaml`).

Against fake API servers on test hosts (198.18.0.0/15), for each data path:
the daemon in the image steers 127.0.0.1:PORT to them, /healthz and /readyz
answer on the node's loopback (where kubelet's probes go), a stopped backend
leaves the set, the steering outlives the container (stopped and removed),
a new container adopts it, and `prism-kernel cleanup` run from the image
removes everything.

Runs only when PRISM_KERNEL_IMAGE names a built image: `packaging/image.sh
check` (or `packaging/dev.sh image`) builds it and runs this module with the
podman storage it built into, under the host-tests lock.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.harness import client_context, kernel_leftovers, prism, who

IMAGE = os.environ.get("PRISM_KERNEL_IMAGE")
if not IMAGE:
    pytest.skip("PRISM_KERNEL_IMAGE is not set: packaging/image.sh check builds the image and runs this",
                allow_module_level=True)

pytestmark = pytest.mark.kernel

STATE = os.environ.get("PRISM_KERNEL_IMAGE_STATE", "/var/tmp/prism-kernel-image")
RUNROOT = os.environ.get("PRISM_KERNEL_IMAGE_RUNROOT", "/run/prism-kernel-image-podman")
INSTANCE = "pk-image"
PORT = 17447  # never 7445, nor the suites' 17445
METRICS_PORT = 17451
PREFIX = "pki"
NET_OFFSET = 40  # 198.18.41.0/24 ...: apart from the other suites' test hosts
CONTAINER = "pk-image-check"


def podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["podman", "--root", f"{STATE}/storage", "--runroot", RUNROOT, "--storage-driver", "overlay",
                        "--runtime", "runc", "--cgroup-manager", "cgroupfs", *args],
                       capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"podman {' '.join(args)}: {r.stdout}\n{r.stderr}"
    return r


def container_argv(name: str, config_dir: Path, *cmd: str, detach: bool = True) -> list[str]:
    """The DaemonSet's pod as podman options (packaging/daemonset.yaml)."""
    return [
        "run", *(["-d"] if detach else ["--rm"]), "--name", name,
        "--network", "host", "--privileged", "--cgroupns", "host",
        # A root without CAP_SYS_RESOURCE cannot raise podman's default ulimits.
        "--ulimit", "nofile=16384:16384", "--ulimit", "nproc=8192:8192",
        "-v", "/sys/fs/bpf:/sys/fs/bpf:rshared",                 # mountPropagation: Bidirectional
        "-v", "/sys/fs/cgroup:/sys/fs/cgroup:ro,rslave",         # HostToContainer, readOnly
        "-v", f"/run/{INSTANCE}:/run/{INSTANCE}",                # the run directory (lock, state, sysctls)
        "-v", f"{config_dir}:/etc/prism-kernel:ro",              # the ConfigMap / the node's directory
        IMAGE, *cmd,
    ]


def logs(name: str) -> list[dict]:
    r = podman("logs", name, check=False)
    out = []
    for line in (r.stdout + r.stderr).splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            out.append({"event": "unparsed", "line": line})
    return out


def wait_for(what: str, cond, timeout: float = 30, name: str = CONTAINER):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"{what}: not within {timeout} s; container log:\n" + "\n".join(map(str, logs(name)[-30:])))


def http_status(path: str) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}{path}", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def status_json(name: str = CONTAINER) -> dict:
    r = podman("exec", name, "prism-kernel", "status", "--instance", INSTANCE, "-o", "json", check=False)
    return json.loads(r.stdout) if r.stdout.strip() else {}


def active(name: str = CONTAINER) -> set[str]:
    return set((status_json(name).get("state") or {}).get("active", []))


def remove_containers() -> None:
    for name in (CONTAINER, f"{CONTAINER}-2", f"{CONTAINER}-cleanup"):
        podman("rm", "-f", "-t", "10", name, check=False)


@pytest.fixture
def testbed():
    from tests.testbed import Testbed, clear_stale

    clear_stale(PREFIX)
    remove_containers()
    prism("cleanup", "--instance", INSTANCE, "--force")
    with Testbed(n_backends=3, prefix=PREFIX, net_offset=NET_OFFSET) as tb:
        try:
            yield tb
        finally:
            remove_containers()
            prism("cleanup", "--instance", INSTANCE, "--force")
            shutil.rmtree(f"/run/{INSTANCE}", ignore_errors=True)
    assert kernel_leftovers(INSTANCE) == []


def test_image_has_no_compiler_headers_or_bcc():
    r = podman("run", "--rm", "--network", "none", "--ulimit", "nofile=16384:16384", "--ulimit", "nproc=8192:8192",
               "--entrypoint", "/bin/sh", IMAGE, "-c",
               "command -v clang gcc cc; ls -d /usr/src/linux-headers-* /lib/modules/*/build 2>/dev/null; "
               "python3 -c 'import bcc' 2>/dev/null && echo bcc; "
               "dpkg-query -W -f='${Package}\\n' libbpf1 nftables python3-nftables iproute2 ca-certificates python3-venv; "
               "/opt/prism-kernel/venv/bin/pip show -f prism-kernel | grep -E '^(Location|Editable)|bpf.o|ruleset.json'",
               check=False)
    lines = r.stdout.split()
    assert "clang" not in r.stdout and "linux-headers" not in r.stdout and "bcc" not in lines, r.stdout
    for pkg in ("libbpf1", "nftables", "python3-nftables", "iproute2", "ca-certificates", "python3-venv"):
        assert pkg in lines, (pkg, r.stdout, r.stderr)
    assert "Editable" not in r.stdout and "/opt/prism-kernel/venv/lib/python3" in r.stdout
    assert "prism_kernel/bpf/prism_sock.bpf.o" in r.stdout and "prism_kernel/nft/ruleset.json" in r.stdout


@pytest.mark.parametrize("datapath", ["ebpf", "nftables"])
def test_the_image_steers_fails_over_and_leaves_the_kernel_steering(testbed, tmp_path, datapath):
    tb = testbed
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    shutil.copy(tb.ca_file, config_dir / "ca.pem")
    endpoints = [b.endpoint for b in tb.backends]
    (config_dir / "config.yaml").write_text(yaml.safe_dump({
        "endpoints": endpoints, "port": PORT, "datapath": datapath, "instance": INSTANCE,
        "probe": {"mode": "readyz", "interval": "200ms", "timeout": "500ms", "rise": 2, "fall": 2,
                  "ca_file": "/etc/prism-kernel/ca.pem"},
        "metrics": {"address": "127.0.0.1", "port": METRICS_PORT},
        "cleanup_on_exit": False, "log_format": "json",
    }))
    os.makedirs(f"/run/{INSTANCE}", exist_ok=True)
    ctx = client_context(tb.ca_file)

    # The image's default command: run --config /etc/prism-kernel/config.yaml.
    podman(*container_argv(CONTAINER, config_dir))
    ready = wait_for("datapath_ready", lambda: next((e for e in logs(CONTAINER)
                                                     if e.get("event") == "datapath_ready"), None))
    assert ready["datapath"] == datapath and ready["adopted"] is False, ready
    if datapath == "ebpf":
        assert ready["loader"] == "libbpf", ready  # the precompiled object: no headers, no bcc
    # kubelet's probes, with hostNetwork: the node's loopback.
    assert http_status("/healthz") == 200
    wait_for("/readyz 200", lambda: http_status("/readyz") == 200)
    wait_for("every backend active", lambda: active() == set(endpoints))
    answered = {who(ctx, PORT) for _ in range(12)}
    assert answered and answered <= {b.name for b in tb.backends}, answered

    victim = tb.backends[0]
    victim.stop()
    wait_for(f"{victim.endpoint} out of the set", lambda: victim.endpoint not in active())
    assert victim.name not in {who(ctx, PORT) for _ in range(12)}

    # The container stops (SIGTERM) and is removed: the kernel keeps steering.
    podman("stop", "-t", "10", CONTAINER, timeout=30)
    podman("rm", CONTAINER)
    assert http_status("/healthz") is None  # no daemon any more
    survivors = {b.name for b in tb.backends[1:]}
    assert {who(ctx, PORT) for _ in range(12)} <= survivors

    # A new container adopts what the kernel holds.
    podman(*container_argv(f"{CONTAINER}-2", config_dir))
    ready2 = wait_for("datapath_ready (adopted)", lambda: next(
        (e for e in logs(f"{CONTAINER}-2") if e.get("event") == "datapath_ready"), None), name=f"{CONTAINER}-2")
    assert ready2["datapath"] == datapath and ready2["adopted"] is True, ready2
    wait_for("/readyz 200 after adopting", lambda: http_status("/readyz") == 200, name=f"{CONTAINER}-2")
    assert {who(ctx, PORT) for _ in range(12)} <= survivors
    podman("stop", "-t", "10", f"{CONTAINER}-2", timeout=30)
    podman("rm", f"{CONTAINER}-2")

    # `prism-kernel cleanup` from the image removes it all.
    assert kernel_leftovers(INSTANCE) != []
    r = podman(*container_argv(f"{CONTAINER}-cleanup", config_dir, "cleanup", "--instance", INSTANCE,
                               detach=False), timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert kernel_leftovers(INSTANCE) == []
