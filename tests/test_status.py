"""`prism-kernel status` for people and scripts (no daemon needed)."""

import io
import json
import subprocess
import sys

import yaml

from prism_kernel.observe.status import render, render_text, run_status

STATE = {
    "schema": 1, "pid": 1, "instance": "x", "datapath": "ebpf", "datapath_reason": "auto: eBPF available",
    "listen_port": 7445, "probe": {"mode": "readyz", "interval_s": 1.0, "timeout_s": 1.0, "rise": 2, "fall": 2},
    "fail_open": False, "active": ["198.18.1.2:6443"],
    "backends": [
        {"address": "198.18.1.2:6443", "endpoints": ["198.18.1.2:6443"], "state": "up", "reason": "ok",
         "latency_ms": 0.4, "tier": 0, "active": True, "down_kind": None, "flaps": 0, "held_out_for_s": None},
        {"address": "198.18.2.2:6443", "endpoints": ["198.18.2.2:6443"], "state": "down", "reason": "refused",
         "latency_ms": None, "tier": None, "active": False, "down_kind": "dead", "flaps": 2, "held_out_for_s": 3.5},
    ],
}
INFO = {"schema": 1, "instance": "x", "daemon": {"running": True, "pid": 1}, "healthy": True, "state": STATE,
        "kernel": {"ebpf": {"installed": True, "backends": ["198.18.1.2:6443"],
                            "counters": {"198.18.1.2:6443": {"connections": 7}}, "details": {"pin_dir": "/sys/fs/bpf/x"}}}}


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_table_shows_health_reason_hold_and_kernel_counters():
    out = io.StringIO()
    render_text(INFO, out)
    text = out.getvalue()
    assert "down (dead), held 3.5s (flaps 2)" in text
    assert "refused" in text and "0.40ms" in text
    lines = [ln for ln in text.splitlines() if ln.startswith("198.18.1.2")]
    assert lines and lines[0].split()[-1] == "7"  # STEERED from the kernel counters
    assert "\033[" not in text  # no colour when not a terminal


def test_colour_only_on_a_terminal(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    out = Tty()
    render_text(INFO, out)
    assert "\033[32m" in out.getvalue() and "\033[31m" in out.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    out = Tty()
    render_text(INFO, out)
    assert "\033[" not in out.getvalue()


def test_yaml_and_json_carry_the_same_document():
    j, y = io.StringIO(), io.StringIO()
    render(INFO, "json", j)
    render(INFO, "yaml", y)
    assert json.loads(j.getvalue()) == yaml.safe_load(y.getvalue()) == json.loads(json.dumps(INFO))


def test_watch_repeats_and_exit_code_says_unhealthy(tmp_path):
    out = io.StringIO()
    code = run_status("pk-status-none", tmp_path, "json", out, watch=0.01, max_rounds=3)
    docs = [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]
    assert len(docs) == 3 and all(not d["daemon"]["running"] for d in docs)
    assert code == 1  # no daemon: not healthy, usable as a health check


def test_cli_pipe_to_a_closed_reader_is_quiet():
    p = subprocess.run(f"{sys.executable} -m prism_kernel status -o yaml --instance pk-status-none | head -1",
                       shell=True, capture_output=True, text=True, timeout=30)
    assert "Traceback" not in p.stderr and p.stdout.startswith("schema: 1")


# --------------------------------------------------------------------------
# healthy = the kernel steers the listen address to a backend that is up (issue 12)

from prism_kernel.observe.status import steering_health  # noqa: E402

UP, DOWN = "198.18.1.2:6443", "198.18.2.2:6443"


def _kernel(backends, installed=True, **details):
    return {"ebpf": {"installed": installed, "backends": backends, "counters": {}, "details": details}}


def test_healthy_only_when_the_kernel_steers_to_an_up_backend():
    ok, why = steering_health(STATE, _kernel([UP], listen_port=7445))
    assert ok and UP in why
    ok, why = steering_health(STATE, _kernel([UP, DOWN]))
    assert ok and DOWN not in why


def test_backends_up_but_the_kernel_steers_nowhere_is_unhealthy():
    """The issue's case: status said healthy (backends up) while the kernel
    held an empty set and 127.0.0.1:7445 was refused."""
    ok, why = steering_health(STATE, _kernel([]))
    assert not ok and "to no backend" in why


def test_the_kernel_steering_only_to_down_backends_is_unhealthy():
    fail_open = {**STATE, "fail_open": True, "backends": [{**b, "state": "down"} for b in STATE["backends"]]}
    ok, why = steering_health(fail_open, _kernel([UP, DOWN]))
    assert not ok and "none of them up (fail-open)" in why
    ok, why = steering_health(STATE, _kernel([DOWN]))
    assert not ok and "none of them up" in why


def test_a_data_path_removed_or_elsewhere_is_unhealthy():
    ok, why = steering_health(STATE, _kernel([], installed=False))
    assert not ok and "holds no ebpf data path" in why
    ok, why = steering_health(STATE, {"ebpf": {"installed": False, "error": "EPERM"}})
    assert not ok and "cannot be read" in why
    ok, why = steering_health(STATE, _kernel([UP], listen_port=1))
    assert not ok and "steers port 1" in why
    ok, why = steering_health({**STATE, "datapath": "nftables"},
                              {"nftables": {"installed": True, "backends": [UP], "details": {
                                  "current_layout": False, "problems": ["no steer rule"]}}})
    assert not ok and "damaged: no steer rule" in why
    ok, why = steering_health({**STATE, "datapath": None}, _kernel([UP]))
    assert not ok and "not started" in why
    assert steering_health(None, _kernel([UP]))[0] is False


def test_the_table_says_why_it_is_unhealthy():
    out = io.StringIO()
    render_text({**INFO, "healthy": False, "health": "the kernel steers 127.0.0.1:7445 to no backend"}, out)
    assert "UNHEALTHY: the kernel steers 127.0.0.1:7445 to no backend" in out.getvalue()


def test_readyz_verdict_reads_the_kernel():
    """kernel_readiness(): what /readyz answers, from the daemon's verdict and
    the shared scrape read of the kernel."""
    from types import SimpleNamespace

    from prism_kernel.core.model import Backend
    from prism_kernel.datapath import KernelState
    from prism_kernel.observe.status import kernel_readiness

    def reader(*backends, installed=True):
        ks = KernelState("ebpf", installed, tuple(Backend.of(b.rsplit(":", 1)[0], int(b.rsplit(":", 1)[1])) for b in backends))
        return lambda: SimpleNamespace(value=ks, error=None)

    assert kernel_readiness((True, "ok"), STATE, reader(UP))[0] is True
    assert kernel_readiness((False, "stalled"), STATE, reader(UP)) == (False, "stalled")
    assert kernel_readiness((True, "ok"), STATE, None) == (True, "ok")
    ok, why = kernel_readiness((True, "ok"), STATE, reader())
    assert not ok and "to no backend" in why
    ok, why = kernel_readiness((True, "fail-open"), STATE, reader(DOWN))
    assert not ok and "none of them up" in why
    ok, why = kernel_readiness((True, "ok"), STATE, reader(UP, installed=False))
    assert not ok and "holds no ebpf" in why
    ok, why = kernel_readiness((True, "ok"), STATE, lambda: SimpleNamespace(value=None, error=OSError("EPERM")))
    assert not ok and "EPERM" in why
