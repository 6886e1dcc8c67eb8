"""The initial SYN retransmission timeout of a steered connect, per backend.

A connect to a black-holed backend sits in SYN_SENT until the first SYN
retransmission timer fires; only then does the kernel mark the backend
suspect (eBPF sockops) and the daemon confirm it dead. The kernel's timer is
1 s for every connection (TCP_TIMEOUT_INIT). The daemon knows each backend's
round-trip time from its probes, so the eBPF data path gives steered connects
a timer derived from it (docs/design/ebpf-program.md, "Initial SYN RTO"):

    rto = clamp(3 x worst recent RTT + 50 ms, 100 ms, 1000 ms)

No RTT known: no value (the kernel default). The daemon's confirmation of a
SYN timeout bounds its own connect by the same RTO, but never below 200 ms
(confirm_connect_ms). Pure: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from prism_kernel.core.model import Backend

# The floor is the timer a local backend (well under 1 ms away) gets: 100x
# its RTT. A timer that fires early costs little: one duplicate SYN and a
# suspect mark (the backend skipped for 2 s, at most 2 s in 10 s), which the
# confirmation then clears. Never above the kernel default: a backend so far
# away that the rule asks for more keeps TCP_TIMEOUT_INIT.
FLOOR_MS = 100
CEILING_MS = 1000
# The confirmation's verdict is the expensive one (a dead backend leaves the
# set and its connections are aborted): its connect keeps the backend's RTO
# but at least Linux's TCP_RTO_MIN, twice the SYN timer's floor.
CONFIRM_FLOOR_MS = 200
# 3x the worst recent sample covers a SYN-ACK delayed by queueing up to
# twice the RTT; the constant covers scheduling and timer granularity
# (a jiffy is up to 10 ms) for backends whose RTT is tiny.
RTT_FACTOR = 3
MARGIN_MS = 50


def initial_syn_rto_ms(worst_rtt_s: float | None) -> int | None:
    """The initial SYN RTO (ms) for a backend whose worst recent RTT is
    `worst_rtt_s` seconds; None (kernel default) when none is known."""
    if worst_rtt_s is None or not math.isfinite(worst_rtt_s) or worst_rtt_s < 0:
        return None
    us = round(worst_rtt_s * 1_000_000)  # whole microseconds: no float residue in the ceiling
    ms = -(-RTT_FACTOR * us // 1000) + MARGIN_MS
    return max(FLOOR_MS, min(CEILING_MS, ms))


def confirm_connect_ms(syn_rto_ms: int) -> int:
    """How long the confirmation of a backend whose steered SYNs get
    `syn_rto_ms` waits for its own connect (ms)."""
    return max(CONFIRM_FLOOR_MS, syn_rto_ms)


def worst_rtt(samples: Iterable[float | None]) -> float | None:
    """The largest of a backend's recent RTT samples (seconds), None when it
    has none (every probe failed, or none ran yet)."""
    known = [s for s in samples if s is not None]
    return max(known) if known else None


def syn_rto_ms_by_backend(rtt_samples: Mapping[Backend, Iterable[float | None]]) -> dict[Backend, int]:
    """Backend -> initial SYN RTO (ms) from each backend's recent RTT samples
    (seconds); a backend without a known RTT is left out (kernel default).
    What Datapath.set_syn_rto() takes."""
    out: dict[Backend, int] = {}
    for backend, samples in rtt_samples.items():
        ms = initial_syn_rto_ms(worst_rtt(samples))
        if ms is not None:
            out[backend] = ms
    return out


def ms_to_jiffies(ms: int, hz: int) -> int:
    """`ms` in jiffies of a kernel ticking at `hz`, rounded up (a timer never
    shorter than asked; the sockops reply is in jiffies)."""
    if hz <= 0:
        raise ValueError(f"HZ {hz}")
    return -(-ms * hz // 1000)


# A new RTO is handed to the kernel only when it matters (each change is a
# set write): a rise at once, rounded up to STEP_MS (a slower backend must
# never wait for a spurious suspect mark); a fall only below LOWER_BELOW of
# the current one (jitter in the worst sample would otherwise write every
# probe interval).
STEP_MS = 25
LOWER_BELOW = 0.8


def settle(current_ms: int | None, wanted_ms: int | None) -> int | None:
    """The RTO to keep for a backend whose timer is `current_ms` when the
    rule asks for `wanted_ms` (None: no RTT known, the kernel default)."""
    if wanted_ms is None:
        return current_ms  # no fresh sample (a failed probe): the last timer stands
    stepped = min(CEILING_MS, -(-wanted_ms // STEP_MS) * STEP_MS)
    if current_ms is None or stepped > current_ms or wanted_ms < LOWER_BELOW * current_ms:
        return stepped
    return current_ms
