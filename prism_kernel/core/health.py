"""Per-backend health: rise/fall hysteresis, smoothed latency, latency tier.

Pure: no I/O and no clock (the caller passes `now`), so every transition is
unit-tested. One `BackendHealth` per backend address.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Literal

from prism_kernel.core.model import Backend

# Tier boundaries in seconds: KubePrism's decade buckets (<1 ms, <10 ms,
# <100 ms, <1 s, >=1 s). Tier 0 is the fastest.
TIER_BOUNDS: tuple[float, ...] = (0.001, 0.010, 0.100, 1.0)
MAX_TIER = len(TIER_BOUNDS)
# A smoothed latency must cross a boundary by this fraction before the tier
# changes, so a backend sitting near a boundary does not flip back and forth.
TIER_HYSTERESIS = 0.25
# Latency is the minimum of the last LATENCY_WINDOW samples: the floor of
# what a round trip costs, i.e. the network distance plus the least server
# time, which is what tiers are about (KubePrism tiers on TCP connect time).
# Server-side spikes and noise never raise it; a backend that is slow on
# every sample (far away, or saturated) does.
LATENCY_WINDOW = 5
# A backend's tier is unknown until it has this many samples (selection treats
# a healthy backend with no tier yet as in the best tier, like KubePrism's
# initial tier 0); after that a tier change needs this many consecutive
# samples pointing the same way, on top of the band.
TIER_CONFIRM = 3

# Flap damping: a backend that goes down again within FLAP_WINDOW seconds of
# coming up is held out (no rejoin, whatever its probes say) for
# FLAP_BASE_HOLD seconds, doubling with every further flap up to
# FLAP_MAX_HOLD; a backend that stays up for FLAP_WINDOW is forgiven.
FLAP_WINDOW = 60.0  # (the flap count is reset at the next down after that)
FLAP_BASE_HOLD = 2.0
FLAP_MAX_HOLD = 120.0

State = Literal["unknown", "up", "down"]
FailureKind = Literal["dead", "unready"]


def failure_kind(reason: str) -> FailureKind:
    """Dead: the backend cannot do TCP (refused, reset, black-holed, frozen:
    connections to it are useless, close them). Unready: it answers but says
    not ready (/readyz non-200, e.g. draining) or its certificate does not
    verify: stop sending new connections, leave the existing ones alone."""
    if reason.startswith(("http ", "bad http", "readyz timeout")) or (reason.startswith("tls: ") and "timeout" not in reason):
        # readyz timeout: TCP and TLS worked, the answer is slow (etcd trouble
        # looks like this). Only a failed confirmation (a fresh handshake)
        # makes it dead: that is how a frozen process is told from a slow one.
        return "unready"
    return "dead"


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    latency: float | None = None  # seconds, from a monotonic clock; None on failure
    reason: str = "ok"  # on failure: refused, timeout, reset, tls: ..., http 503, ...


@dataclass(frozen=True)
class Change:
    """A state change worth one log line."""

    kind: Literal["up", "down", "tier", "held"]
    backend: Backend
    reason: str
    old: object = None
    new: object = None
    dead: bool = False  # a down change to dead: connections to it are to be aborted


def raw_tier(latency: float) -> int:
    return bisect.bisect_right(TIER_BOUNDS, latency)


def next_tier(latency: float, previous: int | None) -> int:
    """The tier of `latency` given the tier the backend is in now.

    Moving to a slower tier needs the latency at least (1+h) times that tier's
    lower bound; moving to a faster one needs it below (1-h) times the current
    tier's lower bound."""
    if previous is None:
        return raw_tier(latency)
    tier = previous
    while tier < MAX_TIER and latency >= TIER_BOUNDS[tier] * (1 + TIER_HYSTERESIS):
        tier += 1
    while tier > 0 and latency < TIER_BOUNDS[tier - 1] * (1 - TIER_HYSTERESIS):
        tier -= 1
    return tier


@dataclass
class BackendHealth:
    backend: Backend
    state: State = "unknown"
    reason: str = "not probed yet"
    successes: int = 0  # consecutive
    failures: int = 0  # consecutive
    latency: float | None = None  # smoothed (windowed minimum), seconds
    last_latency: float | None = None
    tier: int | None = None
    since: float | None = None  # `now` of the last up/down change
    probes: int = 0
    samples: list[float] = field(default_factory=list)  # the last LATENCY_WINDOW latencies
    down_kind: FailureKind | None = None
    recovered_at: float | None = None  # last down -> up; a quick down after it is a flap
    flaps: int = 0  # recent flaps; decides the hold time
    held_until: float | None = None  # flap penalty: no rejoin before this
    _tier_direction: int = 0  # +1 slower / -1 faster, for the pending change
    _tier_votes: int = 0
    failures_total: dict[str, int] = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        return self.state == "up"

    def observe(self, result: ProbeResult, now: float, rise: int, fall: int) -> list[Change]:
        """Take one probe result; return the changes it caused.

        The first result of a backend decides its state at once (a daemon that
        starts should not wait rise x interval to route); after that, `rise`
        consecutive successes bring it up and `fall` consecutive failures take
        it down."""
        changes: list[Change] = []
        self.probes += 1
        if result.ok:
            self.successes += 1
            self.failures = 0
            if result.latency is not None:
                self.last_latency = result.latency
                self.samples = (self.samples + [result.latency])[-LATENCY_WINDOW:]
                self.latency = min(self.samples)
                self._update_tier(changes)
            if self.state == "unknown" or (self.state == "down" and self.successes >= rise):
                if self.held_until is not None and now < self.held_until:
                    if self.reason != "held out: flapping":
                        changes.append(Change("held", self.backend, "held out: flapping", None, self.held_until))
                    self.reason = "held out: flapping"
                    return changes
                if self.state == "down":
                    self._rejoin_tier(changes)
                changes.append(Change("up", self.backend, result.reason, self.state, "up"))
                self.recovered_at = now if self.state == "down" else None
                self.state, self.since = "up", now
                self.down_kind, self.held_until = None, None
            if self.state == "up":
                self.reason = result.reason
        else:
            self.failures += 1
            self.successes = 0
            self.failures_total[result.reason] = self.failures_total.get(result.reason, 0) + 1
            if self.state == "unknown" or (self.state == "up" and self.failures >= fall):
                changes.append(self._go_down(result.reason, now))
            elif self.state == "down" and self.reason != "held out: flapping":
                self.reason = result.reason
                kind = failure_kind(result.reason)
                if kind == "dead" and self.down_kind == "unready":
                    # A draining server that then died: its connections must
                    # now be aborted, so this is a change of its own.
                    changes.append(Change("down", self.backend, result.reason, "down", "down", dead=True))
                if self.down_kind != "dead":
                    self.down_kind = kind
        return changes

    def mark_down(self, reason: str, now: float) -> list[Change]:
        """Take the backend down at once: the kernel saw a steered connect
        fail and an immediate active probe confirmed it (two independent
        failures, so `fall` is not waited for)."""
        self.failures_total[reason] = self.failures_total.get(reason, 0) + 1
        self.successes = 0
        self.failures = max(self.failures, 1)
        if self.state == "down":
            if self.down_kind == "dead":
                return []
            # Down as unready (draining, slow), now confirmed dead.
            self.down_kind, self.reason = "dead", reason
            return [Change("down", self.backend, reason, "down", "down", dead=True)]
        return [self._go_down(reason, now, "dead")]

    def _go_down(self, reason: str, now: float, kind: FailureKind | None = None) -> Change:
        if self.state == "up" and self.recovered_at is not None and now - self.recovered_at < FLAP_WINDOW:
            self.flaps += 1
            self.held_until = now + min(FLAP_MAX_HOLD, FLAP_BASE_HOLD * 2 ** (self.flaps - 1))
        elif self.state == "up":
            self.flaps = 0  # up long enough since it last came back: forgiven
        kind = kind or failure_kind(reason)
        change = Change("down", self.backend, reason, self.state, "down", dead=kind == "dead")
        self.state, self.since, self.recovered_at = "down", now, None
        # Its latency when it comes back is measured afresh (a restarted or
        # moved server); until then `latency` shows the last value.
        self.samples = []
        self.reason = reason
        self.down_kind = kind
        return change

    def _rejoin_tier(self, changes: list[Change]) -> None:
        """A backend coming back takes the tier of the latency it has now
        (its samples since it went down), without votes: the band and the
        votes keep a backend in the set from flapping between tiers, and this
        one was in no set. Before, it kept the tier it had, or got one from a
        slow first answer after a restart, and stayed out of the best tier
        for TIER_CONFIRM more probes (seen: 1.9 ms, then 0.7 ms)."""
        self._tier_direction, self._tier_votes = 0, 0
        if self.latency is None or (self.tier is None and len(self.samples) < TIER_CONFIRM):
            return  # no tier yet: selection counts it in the best tier, as at start
        tier = raw_tier(self.latency)
        if tier != self.tier:
            changes.append(Change("tier", self.backend, f"latency {self.latency * 1000:.2f}ms", self.tier, tier))
            self.tier = tier

    def _update_tier(self, changes: list[Change]) -> None:
        assert self.latency is not None
        if self.state == "down":
            # Out of the set, the tier decides nothing: it is set afresh when
            # the backend comes back (_rejoin_tier), not voted on meanwhile.
            return
        if self.tier is None:
            if len(self.samples) >= TIER_CONFIRM:
                self.tier = raw_tier(self.latency)
                # A change: selection must now use the tier (until here the
                # backend counted as in the best tier).
                changes.append(Change("tier", self.backend, f"latency {self.latency * 1000:.2f}ms", None, self.tier))
            return
        candidate = next_tier(self.latency, self.tier)
        if candidate == self.tier:
            self._tier_direction, self._tier_votes = 0, 0
            return
        direction = 1 if candidate > self.tier else -1
        if direction == self._tier_direction:
            self._tier_votes += 1
        else:
            self._tier_direction, self._tier_votes = direction, 1
        if self._tier_votes >= TIER_CONFIRM:
            changes.append(Change("tier", self.backend, f"latency {self.latency * 1000:.2f}ms", self.tier, candidate))
            self.tier = candidate
            self._tier_direction, self._tier_votes = 0, 0
