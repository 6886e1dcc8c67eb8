"""`prism-kernel status`: the daemon's live state (its state file, when a
daemon holds the lock) next to what the kernel really holds (read directly,
so it works with no daemon at all).

`-o json` and `-o yaml` print the same document; `--watch S` repeats every
S seconds (JSON: one compact document per line; YAML: `---`-separated).

JSON schema (`-o json`), schema version 1:
  {"schema": 1, "instance": str,
   "daemon": {"running": bool, "pid": int|null, "stale_for_s": float|null},
   "healthy": bool,             # a running daemon, state fresh, and the kernel steers the
                                # listen address to >= 1 backend the daemon sees up
   "health": str,               # why (steering_health)
   "state": {...}|null,         # the daemon's snapshot, see Daemon.snapshot()
   "kernel": {"<datapath>": {"installed": bool, "backends": [str],
                             "counters": {addr: {"connections": int, ...}},
                             "details": {...}} | {"error": str}}}
Exit code: 0 when a daemon runs and the kernel (read here, not the daemon's
word for it) steers the listen address to at least one backend that is up,
1 otherwise (usable as a node health check: it fails on a node with no API
access, e.g. every backend down, or the data path removed behind the
daemon's back).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any, TextIO

from prism_kernel.config import DEFAULT_PORT
from prism_kernel.control.runstate import daemon_pid, read_state
from prism_kernel.datapath import ALL, DatapathSettings, KernelState, datapath_class
from prism_kernel.errors import PrismError

STALE_AFTER = 10.0  # seconds without a state write: the daemon's loop is not turning

# The details people need in the table view; `-o json` has all of them.
_TEXT_DETAILS = ("attach_cgroup", "pin_dir", "loader", "prog_ids", "program_current", "stats", "suspect",
                 "table", "family", "route_localnet", "handles")


def kernel_entry(ks: KernelState) -> dict[str, Any]:
    """A data path's kernel state as `status` shows it (and steering_health reads it)."""
    return {
        "installed": ks.installed,
        "backends": [str(b) for b in ks.backends],
        "counters": {str(b): {"connections": c.connections, **c.extra} for b, c in ks.counters.items()},
        "details": ks.details,
    }


def steering_health(state: dict[str, Any] | None, kernel: dict[str, dict[str, Any]]) -> tuple[bool, str]:
    """(healthy, why): the kernel steers the daemon's listen address to at
    least one backend the daemon sees up. `state` is the daemon's snapshot
    (the state file), `kernel` {data path: kernel_entry()} as read from the
    kernel. Pure; `status` and /readyz both use it. Fail-open (steering to
    every known backend because none is up) is not healthy: the node has no
    working API access then."""
    if not state:
        return False, "no daemon state"
    dp = state.get("datapath")
    if not dp:
        return False, "the data path is not started"
    k = kernel.get(dp) or {}
    port = state.get("listen_port")
    if "error" in k:
        return False, f"the {dp} data path cannot be read from the kernel: {k['error']}"
    if not k.get("installed"):
        return False, f"the kernel holds no {dp} data path of this instance (removed behind the daemon's back?)"
    details = k.get("details") or {}
    if details.get("listen_port") is not None and details["listen_port"] != port:
        return False, f"the kernel steers port {details['listen_port']}, the daemon listens on {port}"
    if details.get("current_layout") is False:
        return False, f"the {dp} data path in the kernel is damaged: {'; '.join(details.get('problems') or [])}"
    steered = k.get("backends") or []
    up = {b["address"] for b in state.get("backends", []) if b.get("state") == "up"}
    healthy = [b for b in steered if b in up]
    if not steered:
        return False, f"the kernel steers 127.0.0.1:{port} to no backend"
    if not healthy:
        return False, (f"the kernel steers 127.0.0.1:{port} to {', '.join(steered)}, none of them up"
                       + (" (fail-open)" if state.get("fail_open") else ""))
    return True, f"the kernel steers 127.0.0.1:{port} to {len(healthy)} healthy backend(s): {', '.join(healthy)}"


def kernel_readiness(ready: tuple[bool, str], snapshot: dict[str, Any] | None,
                     read_kernel: Callable[[], Any] | None) -> tuple[bool, str]:
    """/readyz: the daemon's own verdict (Metrics.readiness(): alive, data
    path started), then steering_health() against the kernel as the scrape
    reader returns it (a metrics_scrape.ReadOutcome of a KernelState, shared
    with scrapes, so /readyz adds no kernel reads). Fail-open is not ready.
    No reader (a Metrics without a daemon, in tests): the daemon's verdict."""
    ok, why = ready
    if not ok or read_kernel is None:
        return ready
    outcome = read_kernel()
    ks = getattr(outcome, "value", None)
    if ks is None:
        return False, f"the kernel state cannot be read: {getattr(outcome, 'error', None)}"
    return steering_health(snapshot, {ks.datapath: kernel_entry(ks)})


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
        kernel[name] = kernel_entry(ks)
    stale = None
    if state and state.get("updated_at"):
        import datetime as dt

        age = time.time() - dt.datetime.fromisoformat(state["updated_at"]).timestamp()
        # The daemon rewrites its state every 2 s: older means its loop is stuck.
        stale = round(age, 1) if age > STALE_AFTER else None
    # Health is what the kernel does, not what the daemon says: a daemon whose
    # data path is not started (retrying), or was removed, or steers nowhere
    # healthy, is not healthy, whatever its probes say.
    healthy, why = steering_health(state, kernel)
    if stale:
        healthy, why = False, f"the daemon's state is {stale}s old: its loop is stuck"
    if pid is None:
        healthy, why = False, "no daemon runs for this instance"
    return {
        "schema": 1,
        "instance": instance,
        "daemon": {"running": pid is not None, "pid": pid if pid and pid > 0 else None, "stale_for_s": stale},
        "healthy": healthy,
        "health": why,
        "state": state,
        "kernel": kernel,
    }


_COLOURS = {"up": "32", "down": "31", "unknown": "33", "warn": "33", "bad": "31", "bold": "1"}


class _Paint:
    """ANSI colour only when writing to a terminal (and NO_COLOR is unset)."""

    def __init__(self, out: TextIO):
        self.on = hasattr(out, "isatty") and out.isatty() and "NO_COLOR" not in os.environ

    def __call__(self, text: str, colour: str) -> str:
        if not self.on or colour not in _COLOURS:
            return text
        return f"\033[{_COLOURS[colour]}m{text}\033[0m"


def _table(rows: list[list[str]], out: TextIO, colours: list[str | None] | None = None, paint: _Paint | None = None) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, r in enumerate(rows):
        cells = [c.ljust(w) for c, w in zip(r, widths)]
        if paint and colours and n > 0 and colours[n - 1]:
            cells[2] = paint(cells[2], colours[n - 1])  # the HEALTH column
        out.write("  ".join(cells).rstrip() + "\n")


def render_text(info: dict[str, Any], out: TextIO = sys.stdout) -> None:
    paint = _Paint(out)
    state = info["state"]
    d = info["daemon"]
    if d["running"]:
        who = f"running (pid {d['pid']})" if d["pid"] else "running"
        if d.get("stale_for_s"):
            who += ", " + paint(f"STUCK: its state is {d['stale_for_s']}s old", "bad")
    else:
        who = paint("NOT RUNNING", "bad") + ": the kernel keeps steering with what it holds below, but nothing probes the backends"
    out.write(f"prism-kernel instance {info['instance']}: daemon {who}\n")
    if info.get("health"):
        verdict = paint("healthy", "up") if info.get("healthy") else paint("UNHEALTHY", "bad")
        out.write(f"{verdict}: {info['health']}\n")
    if state:
        p = state["probe"]
        out.write(
            f"data path {state['datapath'] or 'not started'} ({state['datapath_reason'] or 'choosing'}); "
            f"listen 127.0.0.1:{state['listen_port']}; "
            f"probe {p['mode']} every {p['interval_s']}s, timeout {p['timeout_s']}s, rise {p['rise']}, fall {p['fall']}\n"
        )
        loaded = state.get("datapath_loader") or {}
        if loaded.get("loader"):
            out.write(f"eBPF programs: {loaded['loader']} ({loaded.get('why')})\n")
        start = state.get("datapath_start") or {}
        if not state.get("datapath") and start.get("failures_in_a_row"):
            out.write(paint("DATA PATH NOT STARTED", "bad")
                      + f": {start.get('datapath') or 'choosing'} failed {start['failures_in_a_row']}x, "
                      f"next attempt at {start.get('next_attempt_at')}; last error: {start.get('last_error')}\n")
        elif start.get("fallback"):
            out.write(paint("FALLBACK", "warn") + f": {start['fallback']}\n")
        if state.get("fail_open"):
            out.write(paint("FAIL-OPEN", "bad") + ": no healthy backend; steering to every known backend\n")
        metrics = state.get("metrics") or {}
        if metrics.get("state") == "retrying":
            out.write(paint("METRICS NOT SERVED", "warn") + f": {metrics.get('last_error')}; "
                      f"held by {metrics.get('held_by') or 'unknown'}; next attempt at {metrics.get('next_attempt_at')}\n")
    for name, k in info["kernel"].items():
        if not k.get("installed"):
            if "error" in k and (not state or state.get("datapath") == name):
                out.write(f"kernel {name}: cannot read ({k['error']})\n")
            continue
        out.write(f"kernel {name}: steering to {', '.join(k['backends']) or 'nothing'}\n")
        details = k.get("details", {})
        for key in _TEXT_DETAILS:
            if key in details and details[key] not in ({}, [], None, ""):
                val = details[key]
                if isinstance(val, dict):
                    val = " ".join(f"{a}={b}" for a, b in val.items())
                out.write(f"  {key}: {val}\n")
    counters: dict[str, dict] = {}
    for k in info["kernel"].values():
        counters.update(k.get("counters", {}))
    if state and state.get("backends"):
        rows = [["ENDPOINT", "ADDRESS", "HEALTH", "REASON", "LATENCY", "TIER", "ACTIVE", "STEERED"]]
        colours: list[str | None] = []
        for b in state["backends"]:
            health = b["state"]
            if b["state"] == "down" and b.get("down_kind"):
                health = f"down ({b['down_kind']})"
            if b.get("held_out_for_s"):
                health += f", held {b['held_out_for_s']}s (flaps {b.get('flaps', 0)})"
            colours.append(b["state"])
            lat = "-" if b["latency_ms"] is None else f"{b['latency_ms']:.2f}ms"
            conns = counters.get(b["address"], {}).get("connections")
            rows.append([
                ",".join(b["endpoints"]), b["address"], health, b["reason"], lat,
                "-" if b["tier"] is None else str(b["tier"]), "yes" if b["active"] else "no",
                "-" if conns is None else str(conns),
            ])
        out.write("\n")
        _table(rows, out, colours, paint)
    elif counters:
        rows = [["ADDRESS", "STEERED"]] + [[a, str(c.get("connections", 0))] for a, c in counters.items()]
        out.write("\n")
        _table(rows, out)


def render(info: dict[str, Any], output: str, out: TextIO, one_line: bool = False) -> None:
    if output == "json":
        json.dump(info, out, indent=None if one_line else 2, default=str)
        out.write("\n")
    elif output == "yaml":
        import yaml

        yaml.safe_dump(json.loads(json.dumps(info, default=str)), out, sort_keys=False)
    else:
        render_text(info, out)


def run_status(instance: str, run_dir: Path, output: str, out: TextIO = sys.stdout,
               watch: float | None = None, max_rounds: int | None = None) -> int:
    """Print the status once, or every `watch` seconds until interrupted
    (`max_rounds` bounds it for tests). The exit code is the last round's."""
    rounds = 0
    while True:
        info = gather(instance, run_dir)
        if watch is not None and output == "table" and hasattr(out, "isatty") and out.isatty():
            out.write("\033[H\033[2J")  # clear the terminal between rounds
        render(info, output, out, one_line=watch is not None)
        out.flush()
        rounds += 1
        code = 0 if info["daemon"]["running"] and info["healthy"] else 1
        if watch is None or (max_rounds is not None and rounds >= max_rounds):
            return code
        if output != "table":
            out.write("---\n" if output == "yaml" else "")
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            return code
