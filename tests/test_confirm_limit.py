"""Confirmations started by the kernel's reports are rate-limited per backend
(core/confirm_limit.py; docs/design/confirm-limit.md): a local user whose
steered SYNs never arrive must not drive a confirmation every poll, while a
real failure is confirmed, and applied, at once. Pure: no kernel."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from prism_kernel.core.confirm_limit import FIRST_SPACING_S, MAX_SPACING_S, ConfirmLimit
from prism_kernel.core.health import ProbeResult
from prism_kernel.core.model import Backend

A = Backend.of("198.18.200.1", 6443)
B = Backend.of("198.18.200.2", 6443)


def test_first_report_is_confirmed_and_alive_findings_double_the_spacing():
    lim = ConfirmLimit()
    assert lim.allows(A, 0.0)
    spacings = []
    now = 0.0
    for _ in range(6):
        assert lim.allows(A, now)
        spacings.append(lim.found_alive(A, now))
        assert not lim.allows(A, now + spacings[-1] - 0.01)
        now += spacings[-1]
    assert spacings == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert spacings[0] == FIRST_SPACING_S and max(spacings) == MAX_SPACING_S
    assert lim.allows(B, 0.5)  # per backend


def test_a_real_failure_lifts_the_limit_at_once():
    lim = ConfirmLimit()
    lim.found_alive(A, 0.0)
    lim.found_alive(A, 1.0)
    assert not lim.allows(A, 1.5)
    lim.failed(A)
    assert lim.allows(A, 1.5)
    assert lim.found_alive(A, 1.5) == FIRST_SPACING_S  # the doubling starts over


def test_a_quiet_spell_starts_the_doubling_over():
    lim = ConfirmLimit(quiet=60.0)
    now = 0.0
    for _ in range(4):
        now += lim.found_alive(A, now)
    assert lim.spacing(A) == 8.0
    assert lim.found_alive(A, now + 59.0) == 8.0  # within the quiet time: still 8
    assert lim.found_alive(A, now + 59.0 + 8.0 + 60.0) == FIRST_SPACING_S


def test_the_log_line_comes_at_most_once_a_minute():
    lim = ConfirmLimit(log_every=60.0)
    assert not lim.should_log(A, 0.0)  # no limit in force: nothing to say
    lim.found_alive(A, 0.0)
    said = [t for t in range(130) if lim.should_log(A, float(t))]
    assert said == [0, 60, 120]


def test_forgotten_backends_take_their_state_with_them():
    lim = ConfirmLimit()
    lim.found_alive(A, 0.0)
    lim.found_alive(B, 0.0)
    lim.keep_only([B])
    assert lim.allows(A, 0.1) and not lim.allows(B, 0.1)


# --- the daemon's Targets: reports, confirmations, the log -------------------------


class ListLog:
    def __init__(self):
        self.records: list[tuple[str, dict]] = []

    def info(self, event, **f):
        self.records.append((event, f))

    warn = error = info

    def events(self, name):
        return [f for e, f in self.records if e == name]


def _targets(monkeypatch, alive: dict[Backend, bool]):
    """Targets with two static backends, a fake clock and a fake confirmation
    handshake (alive[backend]); returns (targets, clock, confirmations)."""
    from prism_kernel.config import build_config
    from prism_kernel.control import targets as targets_mod
    from prism_kernel.control.targets import Targets

    clock = SimpleNamespace(now=1000.0)
    started: list[Backend] = []

    async def fake_confirm(backend, timeout, tls, connect_timeout=None):
        started.append(backend)
        return ProbeResult(True, 0.001) if alive[backend] else ProbeResult(False, reason="timeout")

    monkeypatch.setattr(targets_mod, "confirm", fake_confirm)
    monkeypatch.setattr(targets_mod, "time", SimpleNamespace(monotonic=lambda: clock.now, time=time.time))
    config = build_config({"endpoints": [f"{A.address}:6443", f"{B.address}:6443"],
                           "probe": {"mode": "tcp"}}, {})
    log = ListLog()
    t = Targets(config, log, None)
    for b in (A, B):
        t.resolved[next(s for s in config.endpoints if s.host == str(b.address))] = [b]
    t.sync()
    for b in (A, B):  # both up
        for _ in range(config.probe.rise):
            t.observe(b, ProbeResult(True, 0.001))
    return t, clock, started, log


async def _settle(t) -> list:
    """Let started confirmations finish and feed their results back, as the
    daemon's loop does."""
    changes = []
    for _ in range(10):
        await asyncio.sleep(0)
    while not t.results.empty():
        backend, result, passive = t.results.get_nowait()
        changes += t.observe(backend, result, passive)
    return changes


def test_reports_of_a_live_backend_start_few_confirmations(monkeypatch):
    """20 s of kernel reports every 50 ms (400) for a backend that is alive:
    confirmations at 0, 1, 3, 7, 15 s (the spacing doubling to 8 s), one
    confirm_rate_limited line, never a down; without the limit each report
    would start one (shown by making ConfirmLimit allow everything)."""
    async def main():
        t, clock, started, log = _targets(monkeypatch, {A: True, B: False})
        changes = []
        for i in range(400):
            clock.now = 1000.0 + i * 0.05
            t.kernel_saw_failure(A, "syn_timeout", 0, i + 1)
            changes += await _settle(t)
        return t, started, log, changes

    t, started, log, changes = asyncio.run(main())
    assert len(started) == 5, len(started)
    assert [c for c in changes if c.kind == "down"] == []
    assert t.by_backend[A].health.state == "up"
    assert len(log.events("confirm_rate_limited")) == 1
    assert len(log.events("passive_failure")) == 5


def test_a_dead_backend_is_confirmed_and_taken_down_at_once(monkeypatch):
    """A report of a backend that is really dead: confirmed at the first
    report and down at once, also after earlier false alarms opened a
    spacing that a real failure then lifts."""
    async def main():
        alive = {A: True, B: False}
        t, clock, started, _log = _targets(monkeypatch, alive)
        t.kernel_saw_failure(B, "syn_timeout", 0, 1)
        down_b = [c for c in await _settle(t) if c.kind == "down"]
        # A: two false alarms, then it dies; the scheduled probe's dead-looking
        # failure confirms at once, limit or not
        t.kernel_saw_failure(A, "syn_timeout", 0, 1)
        await _settle(t)
        clock.now += 1.0
        t.kernel_saw_failure(A, "syn_timeout", 0, 2)
        await _settle(t)
        assert not t.confirm_limit.allows(A, clock.now + 0.1)
        alive[A] = False
        clock.now += 0.1
        t.observe(A, ProbeResult(False, reason="connect timeout"))
        down_a = [c for c in await _settle(t) if c.kind == "down"]
        return t, started, down_a, down_b

    t, started, down_a, down_b = asyncio.run(main())
    assert [c.backend for c in down_b] == [B] and down_b[0].dead
    assert [c.backend for c in down_a] == [A] and down_a[0].dead
    assert started == [B, A, A, A]
    assert t.confirm_limit.allows(A, 0.0)  # the real failure lifted the spacing
