"""core.rto.settle: when a backend's initial SYN RTO changes (no root)."""

from __future__ import annotations

import pytest

from prism_kernel.core.rto import CEILING_MS, FLOOR_MS, STEP_MS, settle


def test_the_first_value_is_taken_rounded_up_to_a_step():
    assert settle(None, FLOOR_MS) == FLOOR_MS
    assert settle(None, 291) == 300
    assert settle(None, None) is None


@pytest.mark.parametrize("current, wanted, kept", [
    (300, 290, 300),  # jitter below: kept
    (300, 241, 300),  # within 20 %: kept
    (300, 226, 250),  # below 80 % of it: lowered (rounded up)
    (300, 301, 325),  # any rise: at once
    (975, 1000, CEILING_MS),
    (300, None, 300),  # no fresh sample: the last timer stands
])
def test_a_rise_is_taken_at_once_a_fall_only_when_it_is_large(current, wanted, kept):
    assert settle(current, wanted) == kept


def test_settling_is_idempotent_so_the_same_samples_never_write_twice():
    for wanted in range(FLOOR_MS, CEILING_MS + 1, 7):
        once = settle(None, wanted)
        assert settle(once, wanted) == once
        assert once % STEP_MS == 0 and once >= wanted
