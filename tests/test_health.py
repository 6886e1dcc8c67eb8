"""Per-backend health: rise/fall, smoothing and tier hysteresis (pure)."""

import pytest

from prism_kernel.core.health import TIER_BOUNDS, BackendHealth, ProbeResult, next_tier, raw_tier
from prism_kernel.core.model import Backend

B = Backend.of("198.18.1.2", 6443)
OK = ProbeResult(True, 0.0005, "ok")
FAIL = ProbeResult(False, None, "refused")


def run(h, results, rise=2, fall=3):
    changes = []
    for i, r in enumerate(results):
        changes += h.observe(r, float(i), rise, fall)
    return changes


def test_first_result_decides_at_once():
    h = BackendHealth(B)
    assert [c.kind for c in h.observe(OK, 0, 2, 2)] == ["up"]
    h2 = BackendHealth(B)
    assert [c.kind for c in h2.observe(FAIL, 0, 2, 2)] == ["down"]
    assert h2.reason == "refused"


def test_fall_needs_consecutive_failures():
    h = BackendHealth(B)
    run(h, [OK])
    assert run(h, [FAIL, FAIL]) == [] and h.state == "up"
    assert [c.kind for c in h.observe(FAIL, 9, 2, 3)] == ["down"]


def test_success_resets_failure_count():
    h = BackendHealth(B)
    run(h, [OK, FAIL, FAIL, OK, FAIL, FAIL])
    assert h.state == "up"


def test_rise_needs_consecutive_successes():
    h = BackendHealth(B)
    run(h, [FAIL])
    assert h.state == "down"
    run(h, [OK, FAIL, OK])
    assert h.state == "down"
    assert [c.kind for c in h.observe(OK, 9, 2, 3) if c.kind != "tier"] == ["up"]


def test_failure_reasons_are_counted():
    h = BackendHealth(B)
    run(h, [FAIL, ProbeResult(False, None, "connect timeout"), FAIL])
    assert h.failures_total == {"refused": 2, "connect timeout": 1}


@pytest.mark.parametrize("latency,tier", [(0.0, 0), (0.0009, 0), (0.001, 1), (0.05, 2), (0.5, 3), (1.0, 4), (30, 4)])
def test_raw_tier_decades(latency, tier):
    assert raw_tier(latency) == tier


def test_tier_hysteresis_needs_a_clear_crossing():
    # At tier 0, a latency just over 1 ms (inside the band) keeps tier 0.
    assert next_tier(0.0011, 0) == 0
    assert next_tier(0.0013, 0) == 1
    # At tier 1, just under 1 ms keeps tier 1; well under goes back to 0.
    assert next_tier(0.0009, 1) == 1
    assert next_tier(0.0007, 1) == 0
    # Big jumps move several tiers at once.
    assert next_tier(2.0, 0) == 4
    assert next_tier(0.0001, 4) == 0


def test_tier_never_oscillates_on_boundary_noise():
    for bound in TIER_BOUNDS:
        tier = raw_tier(bound * 0.99)
        seen = set()
        for i in range(200):
            sample = bound * (0.9 if i % 2 else 1.1)  # +-10% around the boundary
            tier = next_tier(sample, tier)
            seen.add(tier)
        assert len(seen) == 1


def test_one_slow_sample_does_not_flip_the_tier():
    h = BackendHealth(B)
    run(h, [ProbeResult(True, 0.0004)] * 10)
    assert h.tier == 0
    changes = h.observe(ProbeResult(True, 0.5), 11, 2, 2)  # one 500 ms outlier
    changes += run(h, [ProbeResult(True, 0.0004)] * 10)
    assert h.tier == 0 and not [c for c in changes if c.kind == "tier"]


def test_two_outliers_in_a_row_do_not_flip_the_tier_either():
    h = BackendHealth(B)
    run(h, [ProbeResult(True, 0.0004)] * 10)
    run(h, [ProbeResult(True, 0.05)] * 2 + [ProbeResult(True, 0.0004)] * 20)
    assert h.tier == 0


def test_sustained_slowdown_changes_tier_with_a_log_event():
    h = BackendHealth(B)
    run(h, [ProbeResult(True, 0.0004)] * 5)
    changes = run(h, [ProbeResult(True, 0.02)] * 10)
    assert h.tier == 2
    assert any(c.kind == "tier" for c in changes)


def test_latency_is_the_minimum_of_the_last_five():
    h = BackendHealth(B)
    for i, lat in enumerate([0.003, 0.001, 0.002]):
        h.observe(ProbeResult(True, lat), i, 2, 2)
    assert h.latency == 0.001
    assert h.last_latency == 0.002
    for i, lat in enumerate([0.004, 0.005, 0.006]):
        h.observe(ProbeResult(True, lat), 10 + i, 2, 2)
    assert h.samples == [0.001, 0.002, 0.004, 0.005, 0.006]
    assert h.latency == 0.001
    h.observe(ProbeResult(True, 0.007), 20, 2, 2)  # 0.001 leaves the window
    assert h.latency == 0.002


def test_server_side_spikes_never_raise_the_latency():
    h = BackendHealth(B)
    run(h, [ProbeResult(True, lat) for lat in [0.0004, 0.003, 0.0005, 0.008, 0.0004, 0.002] * 5])
    assert h.latency == 0.0004 and h.tier == 0


def test_two_outliers_in_the_window_do_not_move_the_latency():
    h = BackendHealth(B)
    run(h, [ProbeResult(True, 0.0004)] * 5)
    run(h, [ProbeResult(True, 2.0)] * 2)
    assert h.latency == 0.0004


def test_tier_is_unknown_until_three_samples():
    h = BackendHealth(B)
    h.observe(ProbeResult(True, 0.05), 0, 2, 2)
    h.observe(ProbeResult(True, 0.05), 1, 2, 2)
    assert h.tier is None
    h.observe(ProbeResult(True, 0.05), 2, 2, 2)
    assert h.tier == 2


def test_slow_first_sample_does_not_decide_the_tier():
    """Seen on a loaded machine: the first readyz took 3 ms, the rest 0.3 ms."""
    h = BackendHealth(B)
    changes = run(h, [ProbeResult(True, 0.0032)] + [ProbeResult(True, 0.0003)] * 10)
    assert h.tier == 0
    assert [(c.old, c.new) for c in changes if c.kind == "tier"] == [(None, 0)]  # only the first assignment


# ---- dead versus unready, passive evidence, flap damping -----------------

from prism_kernel.core.health import FLAP_BASE_HOLD, FLAP_MAX_HOLD, FLAP_WINDOW, failure_kind  # noqa: E402


@pytest.mark.parametrize("reason,kind", [
    ("refused", "dead"), ("reset", "dead"), ("connect timeout", "dead"),
    ("tls handshake timeout", "dead"), ("unreachable", "dead"), ("closed by peer", "dead"),
    ("readyz timeout", "unready"),
    ("http 503", "unready"), ("http 500", "unready"), ("bad http response", "unready"),
    ("tls: certificate verify failed", "unready"),
])
def test_failure_kind(reason, kind):
    assert failure_kind(reason) == kind


def test_mark_down_skips_fall_and_records_kind():
    h = BackendHealth(B)
    run(h, [OK] * 3)
    changes = h.mark_down("refused", 10.0)
    assert [c.kind for c in changes] == ["down"] and changes[0].dead
    assert h.state == "down" and h.down_kind == "dead"
    assert h.mark_down("refused", 10.1) == []  # already down: no second event


def test_draining_is_down_but_not_dead():
    h = BackendHealth(B)
    run(h, [OK])
    changes = run(h, [ProbeResult(False, None, "http 503")] * 3)
    down = [c for c in changes if c.kind == "down"]
    assert len(down) == 1 and not down[0].dead
    assert h.down_kind == "unready"


def _cycle(h, t, rise=2, fall=2):
    """down then back up; returns the time after."""
    for _ in range(fall):
        h.observe(FAIL, t, rise, fall)
        t += 1
    for _ in range(rise):
        h.observe(OK, t, rise, fall)
        t += 1
    return t


def test_first_failure_after_a_stable_start_is_not_a_flap():
    h = BackendHealth(B)
    h.observe(OK, 0, 2, 2)
    _cycle(h, 1)
    assert h.flaps == 0 and h.state == "up"


def test_flapping_backend_is_held_out_with_a_growing_penalty():
    h = BackendHealth(B)
    h.observe(OK, 0, 2, 2)
    t = _cycle(h, 1)  # down, back up at t=4: a recovery
    assert h.state == "up"
    # Down again within the window: first flap, held for the base time.
    h.observe(FAIL, t, 2, 2); h.observe(FAIL, t + 1, 2, 2)
    assert h.flaps == 1 and h.held_until == pytest.approx(t + 1 + FLAP_BASE_HOLD)
    held = []
    now = t + 2
    while h.state == "down" and now < t + 50:
        held += h.observe(OK, now, 2, 2)
        now += 0.5
    assert any(c.kind == "held" for c in held)
    assert h.state == "up" and now - 0.5 >= t + 1 + FLAP_BASE_HOLD
    # Second flap: the hold doubles.
    h.observe(FAIL, now, 2, 2); h.observe(FAIL, now + 1, 2, 2)
    assert h.flaps == 2 and h.held_until == pytest.approx(now + 1 + 2 * FLAP_BASE_HOLD)
    assert h.reason == "refused"


def test_the_flap_hold_doubles_up_to_its_limit():
    h = BackendHealth(B)
    h.observe(OK, 0, 2, 2)
    t = _cycle(h, 1)
    holds = []
    for _ in range(10):  # down again right after each return: a flap every time
        h.observe(FAIL, t, 2, 2)
        h.observe(FAIL, t + 1, 2, 2)
        holds.append(h.held_until - (t + 1))
        t = h.held_until + 1
        h.observe(OK, t, 2, 2)
        h.observe(OK, t + 1, 2, 2)
        assert h.state == "up"
        t += 2
    doubling = [FLAP_BASE_HOLD * 2 ** i for i in range(10)]
    assert holds == pytest.approx([min(FLAP_MAX_HOLD, d) for d in doubling])
    assert holds[-1] == FLAP_MAX_HOLD < doubling[-1]  # the limit was reached


def test_stable_backend_is_forgiven():
    h = BackendHealth(B)
    h.observe(OK, 0, 2, 2)
    t = _cycle(h, 1)
    h.observe(FAIL, t, 2, 2); h.observe(FAIL, t + 1, 2, 2)
    assert h.flaps == 1
    t = t + 10
    for i in range(2):
        h.observe(OK, t + i, 2, 2)
    assert h.state == "up"
    t2 = t + FLAP_WINDOW + 5  # up for longer than the window
    h.observe(FAIL, t2, 2, 2); h.observe(FAIL, t2 + 1, 2, 2)
    assert h.flaps == 0 and h.held_until is None


def test_first_tier_is_a_change():
    """Selection re-runs only on changes: the first tier must be one, or a
    slow backend keeps its place from the warm-up forever."""
    h = BackendHealth(B)
    ch = [c for i in range(3) for c in h.observe(ProbeResult(True, 0.3), i, 2, 2)]
    assert h.tier == 3 and [(c.kind, c.old, c.new) for c in ch if c.kind == "tier"] == [("tier", None, 3)]


def test_draining_then_dead_is_a_change_that_aborts_connections():
    h = BackendHealth(B)
    run(h, [OK])
    run(h, [ProbeResult(False, None, "http 503")] * 2, fall=2)
    assert h.down_kind == "unready"
    changes = h.observe(FAIL, 99, 2, 2)
    assert [c.kind for c in changes] == ["down"] and changes[0].dead
    assert h.observe(FAIL, 100, 2, 2) == []  # once


def test_confirmed_dead_while_down_as_unready_is_a_dead_change():
    h = BackendHealth(B)
    run(h, [OK])
    run(h, [ProbeResult(False, None, "readyz timeout")] * 2, fall=2)
    assert h.state == "down" and h.down_kind == "unready"
    ch = h.mark_down("readyz timeout, confirmed: tls handshake timeout", 50)
    assert len(ch) == 1 and ch[0].dead and h.down_kind == "dead"
    assert h.mark_down("again", 51) == []


def test_a_returning_backend_rejoins_in_the_tier_of_its_current_latency():
    """Seen in CI: a backend stopped before its first tier (two slow warm-up
    samples) came back answering 1.9 ms, then 0.7 ms. Its first tier must come
    from the samples since it went down, at the moment it comes back: tier 0,
    not tier 1 from a window mixing old and new samples, then voted down
    three probes later."""
    h = BackendHealth(B)
    run(h, [ProbeResult(True, 0.044), ProbeResult(True, 0.040)])
    assert h.state == "up" and h.tier is None
    run(h, [FAIL, FAIL], fall=2)
    assert h.state == "down"
    back = [ProbeResult(True, 0.0019)] * 2 + [ProbeResult(True, 0.0007)] * 2
    changes = []
    for i, r in enumerate(back):
        changes += h.observe(r, 10.0 + i, 4, 2)
        if i < 3:
            assert h.state == "down" and not [c for c in changes if c.kind == "tier"]
    assert h.state == "up" and h.tier == 0 and h.latency == 0.0007
    assert [(c.kind, c.old, c.new) for c in changes] == [("tier", None, 0), ("up", "down", "up")]


def test_a_down_backend_keeps_its_tier_until_it_comes_back():
    """No tier churn (log lines, state writes) while a backend is out, e.g.
    held out for flapping with answering probes near a tier boundary."""
    h = BackendHealth(B)
    run(h, [ProbeResult(True, 0.0005)] * 3)
    assert h.tier == 0
    run(h, [FAIL, FAIL], fall=2)
    for i, lat in enumerate([0.0013, 0.0008, 0.0013, 0.0008]):
        assert [c for c in h.observe(ProbeResult(True, lat), 20.0 + i, 9, 2) if c.kind == "tier"] == []
    assert h.state == "down" and h.tier == 0
    ch = h.observe(ProbeResult(True, 0.0013), 30.0, 5, 2)  # the 5th success: up, in the tier of min(samples)
    assert [(c.kind, c.new) for c in ch] == [("up", "up")] and h.tier == 0 and h.latency == 0.0008
