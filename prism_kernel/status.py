"""`prism-kernel status`: the daemon's live state (its state file, when a
daemon holds the lock) next to what the kernel really holds (read directly,
so it works with no daemon at all).

JSON schema (`-o json`), schema version 1:
  {"schema": 1, "instance": str,
   "daemon": {"running": bool, "pid": int|null},
   "healthy": bool,             # a running daemon sees >= 1 healthy backend
   "state": {...}|null,         # the daemon's snapshot, see Daemon.snapshot()
   "kernel": {"<datapath>": {"installed": bool, "backends": [str],
                             "counters": {addr: {"connections": int, ...}},
                             "details": {...}} | {"error": str}}}
Exit code: 0 when a daemon runs and at least one backend is healthy, 1
otherwise (usable as a node health check).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

from prism_kernel.config import DEFAULT_PORT
from prism_kernel.datapath import ALL, DatapathSettings, datapath_class
from prism_kernel.errors import PrismError
from prism_kernel.runstate import daemon_pid, read_state


# The details people need in the table view; `-o json` has all of them.
_TEXT_DETAILS = ("attach_cgroup", "pin_dir", "prog_ids", "program_current", "stats",
                 "table", "family", "route_localnet", "handles")


def gather(instance: str, run_dir: Path) -> dict[str, Any]:
    pid = daemon_pid(run_dir)
    state = read_state(run_dir) if pid else None
    port = (state or {}).get("listen_port", DEFAULT_PORT)
    settings = DatapathSettings(listen_port=port, instance=instance)
    kernel: dict[str, Any] = {}
    for name in ALL:
        try:
            ks = datapath_class(name)(settings).read_state()
        except (PrismError, OSError) as e:
            kernel[name] = {"installed": False, "error": str(e)}
            continue
        kernel[name] = {
            "installed": ks.installed,
            "backends": [str(b) for b in ks.backends],
            "counters": {str(b): {"connections": c.connections, **c.extra} for b, c in ks.counters.items()},
            "details": ks.details,
        }
    healthy = bool(state) and any(b["state"] == "up" for b in state.get("backends", []))
    return {
        "schema": 1,
        "instance": instance,
        "daemon": {"running": pid is not None, "pid": pid if pid and pid > 0 else None},
        "healthy": healthy,
        "state": state,
        "kernel": kernel,
    }


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")


def render_text(info: dict[str, Any], out: TextIO = sys.stdout) -> None:
    state = info["state"]
    d = info["daemon"]
    if d["running"]:
        who = f"running (pid {d['pid']})" if d["pid"] else "running"
    else:
        who = "NOT RUNNING: the kernel keeps steering with what it holds below, but nothing probes the backends"
    out.write(f"prism-kernel instance {info['instance']}: daemon {who}\n")
    if state:
        p = state["probe"]
        out.write(
            f"data path {state['datapath']} ({state['datapath_reason']}); listen 127.0.0.1:{state['listen_port']}; "
            f"probe {p['mode']} every {p['interval_s']}s, timeout {p['timeout_s']}s, rise {p['rise']}, fall {p['fall']}\n"
        )
        if state.get("fail_open"):
            out.write("FAIL-OPEN: no healthy backend; steering to every known backend\n")
    for name, k in info["kernel"].items():
        if not k.get("installed"):
            if "error" in k and (not state or state.get("datapath") == name):
                out.write(f"kernel {name}: cannot read ({k['error']})\n")
            continue
        out.write(f"kernel {name}: steering to {', '.join(k['backends']) or 'nothing'}\n")
        details = k.get("details", {})
        for key in _TEXT_DETAILS:
            if key in details:
                val = details[key]
                if isinstance(val, dict):
                    val = " ".join(f"{a}={b}" for a, b in val.items())
                out.write(f"  {key}: {val}\n")
    counters: dict[str, dict] = {}
    for k in info["kernel"].values():
        counters.update(k.get("counters", {}))
    if state and state.get("backends"):
        rows = [["ENDPOINT", "ADDRESS", "HEALTH", "REASON", "LATENCY", "TIER", "ACTIVE", "STEERED"]]
        for b in state["backends"]:
            lat = "-" if b["latency_ms"] is None else f"{b['latency_ms']:.2f}ms"
            conns = counters.get(b["address"], {}).get("connections")
            rows.append([
                ",".join(b["endpoints"]), b["address"], b["state"], b["reason"], lat,
                "-" if b["tier"] is None else str(b["tier"]), "yes" if b["active"] else "no",
                "-" if conns is None else str(conns),
            ])
        out.write("\n")
        _table(rows, out)
    elif counters:
        rows = [["ADDRESS", "STEERED"]] + [[a, str(c.get("connections", 0))] for a, c in counters.items()]
        out.write("\n")
        _table(rows, out)


def run_status(instance: str, run_dir: Path, output: str, out: TextIO = sys.stdout) -> int:
    info = gather(instance, run_dir)
    if output == "json":
        json.dump(info, out, indent=2, default=str)
        out.write("\n")
    else:
        render_text(info, out)
    return 0 if info["daemon"]["running"] and info["healthy"] else 1
