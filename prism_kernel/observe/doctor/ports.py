"""Checks of the ports: who listens where a connect to 127.0.0.1:PORT or
[::1]:PORT would go (Talos KubePrism on 7445), and the metrics port. Read
only (sock_diag and /proc)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prism_kernel.config import DEFAULT_PORT
from prism_kernel.datapath.listeners import listening
from prism_kernel.observe.doctor.check import FAIL, OK, WARN, Check

try:  # the daemon's /metrics, /healthz, /readyz port
    from prism_kernel.observe.metrics_server import DEFAULT_METRICS_PORT
except Exception:  # pragma: no cover - doctor must work even when the metrics code cannot load
    DEFAULT_METRICS_PORT = 7450

# Never suggested as an alternative port: what Talos uses on a node (KubePrism
# 7445, apid 50000, trustd 50001, API server 6443, kubelet 10250, etcd
# 2379/2380), 7446-7448 (Eclipse Zenoh, and taken by another KubePrism-like
# endpoint) and prism-kernel's own metrics port.
AVOID_PORTS = {6443, 7445, 7446, 7447, 7448, DEFAULT_METRICS_PORT, 10250, 2379, 2380, 50000, 50001}


def listeners(port: int) -> list[dict[str, Any]]:
    """Sockets listening on PORT that a connect to 127.0.0.1:PORT or [::1]:PORT
    would reach (loopback or wildcard), with their processes: the same query
    `run` refuses on (datapath/listeners.py), read-only."""
    return [l.as_dict() for l in listening(port)]


def free_port_near(port: int) -> int | None:
    for p in range(max(port + 1, 1024), min(port + 64, 65535)):
        if p not in AVOID_PORTS and not listeners(p):
            return p
    return None


def check_port(port: int, instance: str, take_over: bool = False) -> Check:
    """`fail` when something listens there: `run` refuses to start over it
    (exit 2) unless told to take the address over (`take_over`: then `warn`)."""
    from prism_kernel.control.runstate import daemon_pid

    pid = daemon_pid(Path(f"/run/{instance}"))
    details: dict[str, Any] = {"port": port, "instance_daemon_pid": pid if pid and pid > 0 else None,
                               "instance_daemon_running": pid is not None}
    found = listeners(port)
    details["listeners"] = found
    if not found:
        running = f"; a prism-kernel daemon runs for instance {instance!r}" if pid else ""
        return Check("port", OK, f"nothing listens on 127.0.0.1:{port} or [::1]:{port}{running}", details=details)
    who = ", ".join(f"{l['address']}" + (f" ({l['process']})" if l.get("process") else "") for l in found)
    alt = free_port_near(port)
    details["suggested_port"] = alt
    alt_text = f"--port {alt} (free here)" if alt else "another free port"
    if port == DEFAULT_PORT:
        kubeprism = ("; on Talos this is KubePrism, a userspace proxy on 7445 (enabled by default "
                     "since Talos 1.6)")
        instead = ("instead of it: disable it (Talos < 1.14: machine.features.kubePrism.enabled: false; "
                   "Talos >= 1.14: remove the KubePrismConfig document) and keep prism-kernel on 7445, "
                   "so the clients configured for 7445 keep their configuration (docs/integration.md)")
    else:
        kubeprism = ""
        instead = "instead of it: stop that listener first"
    details["take_over"] = take_over
    if take_over:
        return Check(
            "port", WARN,
            f"port {port} is taken: {who}{kubeprism}. With --take-over-listen-address prism-kernel steers "
            f"every connect to 127.0.0.1:{port} from the host network namespace away from it (the kernel "
            "rewrites it before it reaches the listener)",
            f"stop that listener once prism-kernel serves, or run beside it on {alt_text}", details=details)
    return Check(
        "port", FAIL,
        f"port {port} is taken: {who}{kubeprism}. `prism-kernel run` refuses to start over it (exit 2): "
        f"it would steer every connect to 127.0.0.1:{port} away from that listener",
        f"run beside it on {alt_text} and point the clients you choose there, or {instead}, "
        "or take the address over deliberately with --take-over-listen-address (take_over_listen_address: true)",
        blocks_run=True, details=details)


def check_metrics_port(instance: str, port: int = DEFAULT_METRICS_PORT) -> Check:
    from prism_kernel.control.runstate import daemon_pid

    found = listeners(port)
    if not found:
        return Check("metrics_port", OK, f"127.0.0.1:{port} (/metrics, /healthz, /readyz) is free",
                     details={"port": port})
    pid = daemon_pid(Path(f"/run/{instance}"))
    owners = [l.get("process") or "" for l in found]
    if pid and pid > 0 and all(o.endswith(f"(pid {pid})") for o in owners):
        return Check("metrics_port", OK, f"127.0.0.1:{port} is served by the running daemon (pid {pid})",
                     details={"port": port, "listeners": found})
    who = ", ".join(f"{l['address']}" + (f" ({l['process']})" if l.get("process") else "") for l in found)
    return Check("metrics_port", WARN, f"metrics port {port} is taken: {who}; the daemon's /metrics, "
                 "/healthz and /readyz (the DaemonSet's probes) would not be reachable there",
                 "free the port, or give the daemon another metrics port (and the probes with it)",
                 details={"port": port, "listeners": found})

