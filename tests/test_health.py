"""Per-backend health: rise/fall, smoothing and tier hysteresis (pure)."""

import pytest

from prism_kernel.health import TIER_BOUNDS, BackendHealth, ProbeResult, next_tier, raw_tier
from prism_kernel.model import Backend

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
    assert [c.kind for c in h.observe(OK, 9, 2, 3)] == ["up"]


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


def test_latency_is_the_lower_median_of_the_last_five():
    h = BackendHealth(B)
    for i, lat in enumerate([0.001, 0.003, 0.002]):
        h.observe(ProbeResult(True, lat), i, 2, 2)
    assert h.latency == 0.002
    assert h.last_latency == 0.002
    for i, lat in enumerate([0.004, 0.005, 0.006]):
        h.observe(ProbeResult(True, lat), 10 + i, 2, 2)
    assert h.samples == [0.003, 0.002, 0.004, 0.005, 0.006]
    assert h.latency == 0.004


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
    assert not [c for c in changes if c.kind == "tier"]
