"""The backends being probed: where they come from (static endpoints, names
re-resolved, discovered EndpointSlices), one probe task per backend, and what
each result does to its health, a fatal-looking failure confirmed at once by
a fresh handshake. Runs on the event loop and touches no kernel state: what
the kernel should hold follows from the health kept here (selection, then
the writer)."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from prism_kernel.config import Config, ProbeConfig
from prism_kernel.core.confirm_limit import ConfirmLimit
from prism_kernel.core.health import BackendHealth, Change, ProbeResult, failure_kind
from prism_kernel.core.model import Backend
from prism_kernel.core.rto import confirm_connect_ms, settle, syn_rto_ms_by_backend
from prism_kernel.core.selection import Candidate
from prism_kernel.log import EventLog
from prism_kernel.observe.metrics import Metrics
from prism_kernel.probing.probes import Prober, confirm, make_confirm_context, make_ssl_context
from prism_kernel.sources.endpoints import EndpointSpec, resolve
from prism_kernel.sources.family_limit import FamilyLimit

RESOLVE_TIMEOUT = 5.0  # seconds for one name's getaddrinfo

# (backend, result, passive): `passive` names the kernel's report a
# confirming probe answers, None for a scheduled probe.
Result = tuple[Backend, ProbeResult, "str | None"]


@dataclass
class Target:
    """A backend being probed: its health, where it came from, its prober."""

    health: BackendHealth
    origins: list[str]
    prober: Prober
    host: str = ""  # the host the operator wrote (a DNS name, or the address): the TLS name
    task: asyncio.Task | None = None
    since_wall: float | None = None


class Targets:
    """Every backend the daemon knows, keyed by address, with its probe task.
    Probe and confirmation results arrive in `results`; `observe()` turns
    one into health changes."""

    def __init__(self, config: Config, log: EventLog, metrics: Metrics | None):
        self.config = config
        self.log = log
        self.metrics = metrics
        self.ssl_context = make_ssl_context(config.probe)
        self._confirm_tls = make_confirm_context() if config.probe.mode != "tcp" else None
        self.by_backend: dict[Backend, Target] = {}
        self._syn_rto: dict[Backend, int] = {}  # settled: see syn_rto()
        self.resolved: dict[EndpointSpec, list[Backend]] = {}
        self.discovered: list[EndpointSpec] = []  # what the EndpointSlices name
        self.family_limit = FamilyLimit(log)  # what reaches the kernel: 64 per family
        self.results: asyncio.Queue[Result] = asyncio.Queue()
        # False until the first round: a backend added before that is probed by it.
        self.probing = False
        self._confirming: set[Backend] = set()
        # Kernel reports of one backend start at most one confirmation per
        # spacing once one found it alive (core/confirm_limit.py): a local
        # user's expiring SYNs must not drive a handshake every poll.
        self.confirm_limit = ConfirmLimit()
        self._tasks: set[asyncio.Task] = set()

    # ---- where the backends come from ---------------------------------------

    def all_specs(self) -> list[EndpointSpec]:
        """Static endpoints (always kept), then the discovered ones not among them."""
        static = set(self.config.endpoints)
        return list(self.config.endpoints) + [s for s in self.discovered if s not in static]

    def set_discovered(self, specs: list[EndpointSpec]) -> None:
        """The discovered endpoints are addresses (no DNS): new ones are
        probed before they are chosen, gone ones leave at once."""
        self.discovered = list(specs)
        self.keep_only_current_specs()
        for s in self.discovered:
            self.resolved[s] = [Backend.of(s.host, s.port)]
        self.sync()

    def keep_only_current_specs(self) -> None:
        keep = set(self.all_specs())
        self.resolved = {s: bs for s, bs in self.resolved.items() if s in keep}

    async def resolve_all(self) -> None:
        specs = self.all_specs()
        # getaddrinfo has no timeout of its own: a DNS server that does not
        # answer must not hold the names back for long.
        results = await asyncio.gather(*(asyncio.wait_for(resolve(s), RESOLVE_TIMEOUT) for s in specs),
                                       return_exceptions=True)
        for spec, res in zip(specs, results):
            if isinstance(res, BaseException):
                # Keep what the name resolved to before: a DNS outage must not
                # take backends away.
                self.log.warn("resolve_failed", endpoint=str(spec), error=str(res),
                              keeping=",".join(map(str, self.resolved.get(spec, []))) or "nothing")
                continue
            if spec.is_name and res != self.resolved.get(spec):
                self.log.info("resolved", endpoint=str(spec), addresses=",".join(map(str, res)))
            self.resolved[spec] = res
        self.sync()

    def sync(self) -> None:
        """Targets follow `resolved`: new backends get a prober (and a probe
        task once probing started), gone ones are dropped with their task."""
        origins: dict[Backend, list[str]] = {}
        names: dict[Backend, str] = {}
        static = set(self.config.endpoints)
        for spec, backends in self.family_limit.apply((s, self.resolved.get(s, [])) for s in self.all_specs()):
            for b in backends:
                origins.setdefault(b, []).append(str(spec) if spec in static else "endpointslice")
                names.setdefault(b, spec.host)
        for b in list(self.by_backend):
            if b not in origins:
                t = self.by_backend.pop(b)
                if t.task:
                    t.task.cancel()
                t.prober.abort()  # its kept-alive readyz connection goes too
                self.log.info("backend_removed", address=str(b))
        self.confirm_limit.keep_only(origins)
        for b, orig in origins.items():
            if b in self.by_backend:
                self.by_backend[b].origins = orig
                continue
            prober = Prober(b, self.config.probe, self.ssl_context, server_name=names[b])
            t = Target(BackendHealth(b), orig, prober, host=names[b])
            self.by_backend[b] = t
            if self.probing:
                t.task = asyncio.create_task(self._probe_loop(b, prober))

    def candidates(self) -> list[Candidate]:
        return [Candidate(b, t.health.healthy, t.health.tier) for b, t in self.by_backend.items()]

    def syn_rto(self) -> dict[Backend, int]:
        """The initial SYN RTO (ms) of each backend with a measured latency
        (core/rto.py): what steered connects to it get (eBPF), and what
        bounds its confirmation's connect (rto.confirm_connect_ms). Settled
        (rto.settle): the same samples give the same answer, jitter gives no
        new one."""
        wanted = syn_rto_ms_by_backend({b: t.health.samples for b, t in self.by_backend.items()})
        settled = {}
        for b in self.by_backend:
            ms = settle(self._syn_rto.get(b), wanted.get(b))
            if ms is not None:
                settled[b] = ms
        self._syn_rto = settled
        return dict(settled)

    def dead(self) -> list[Backend]:
        return [b for b, t in self.by_backend.items() if t.health.state == "down" and t.health.down_kind == "dead"]

    # ---- probing ------------------------------------------------------------

    async def _probe_loop(self, backend: Backend, prober: Prober) -> None:
        cfg = self.config.probe
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            result = await prober.probe()
            self.results.put_nowait((backend, result, None))
            spread = cfg.interval * cfg.jitter
            delay = cfg.interval + random.uniform(-spread, spread) - (loop.time() - started)
            await asyncio.sleep(max(0.0, delay))

    async def first_round(self, stopped: asyncio.Event, heartbeat) -> None:
        """Start probing and take every backend's first result (bounded by
        the probe timeout) before the first write, so that a fresh start
        does not steer to a dead backend for a whole interval."""
        self.probing = True
        for b, t in self.by_backend.items():
            t.task = asyncio.create_task(self._probe_loop(b, t.prober))
        pending = set(self.by_backend)
        deadline = time.monotonic() + self.config.probe.timeout + 0.5
        while pending and not stopped.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                backend, result, _ = await asyncio.wait_for(self.results.get(), left)
            except asyncio.TimeoutError:
                break
            self.observe(backend, result)
            pending.discard(backend)
            heartbeat()

    async def use_probe_config(self, probe: ProbeConfig) -> None:
        """A reloaded `probe` section: new probers (health kept), restarted tasks."""
        self.ssl_context = make_ssl_context(probe)
        self._confirm_tls = make_confirm_context() if probe.mode != "tcp" else None
        for b, t in self.by_backend.items():
            if t.task:
                t.task.cancel()
            await t.prober.close()
            t.prober = Prober(b, probe, self.ssl_context, server_name=t.host)
            t.task = asyncio.create_task(self._probe_loop(b, t.prober))

    async def close(self) -> None:
        for t in self.by_backend.values():
            if t.task:
                t.task.cancel()
        for t in self.by_backend.values():
            await t.prober.close()

    # ---- results ------------------------------------------------------------

    def observe(self, backend: Backend, result: ProbeResult, passive: str | None = None) -> list[Change]:
        t = self.by_backend.get(backend)
        if t is None:  # removed by a re-resolution while its probe ran
            return []
        cfg = self.config.probe
        if passive is not None:
            if result.ok:
                # Not confirmed: a lost SYN, or a live server that is only
                # slow. The scheduled probes decide, as for any failure.
                spacing = self.confirm_limit.found_alive(backend, time.monotonic())
                self.log.info("failure_unconfirmed", address=str(backend), saw=passive,
                              next_confirm_after_s=spacing)
                return []
            self.confirm_limit.failed(backend)  # a real failure: no spacing for the next one
            changes = t.health.mark_down(f"{passive}, confirmed: {result.reason}", time.monotonic())
        else:
            changes = t.health.observe(result, time.monotonic(), cfg.rise, cfg.fall)
            if (not result.ok and t.health.down_kind != "dead" and backend not in self._confirming
                    and (failure_kind(result.reason) == "dead" or result.reason == "readyz timeout")):
                # A fatal-looking failure: confirm it now rather than wait
                # `fall` intervals (and tell a frozen server from a slow one).
                self.start_confirm(backend, result.reason)
        if self.metrics is not None:
            if passive is None:
                self.metrics.observe_probe(backend, result, changes)
            else:
                self.metrics.observe_changes(backend, changes)
        for c in changes:
            if c.kind == "down":
                self.confirm_limit.failed(backend)
            self._log_change(t, c)
            if c.kind in ("up", "down"):
                t.since_wall = time.time()
        return changes

    def kernel_saw_failure(self, backend: Backend, saw: str, refused: int, syn_timeouts: int) -> None:
        """The kernel counted failed connects to `backend`: confirm unless it
        is already out or being confirmed."""
        t = self.by_backend.get(backend)
        if t is None or t.health.state == "down" or backend in self._confirming:
            return
        now = time.monotonic()
        if not self.confirm_limit.allows(backend, now):
            if self.confirm_limit.should_log(backend, now):
                self.log.warn("confirm_rate_limited", address=str(backend), kernel_saw=saw,
                              spacing_s=self.confirm_limit.spacing(backend),
                              why="recent confirmations found it alive")
            return
        self.log.info("passive_failure", address=str(backend), kernel_saw=saw,
                      refused=refused, syn_timeouts=syn_timeouts)
        self.start_confirm(backend, saw)

    def _log_change(self, t: Target, c: Change) -> None:
        h = t.health
        common = dict(address=str(c.backend), endpoint=",".join(t.origins))
        if c.kind == "up":
            self.log.info("backend_up", **common, reason=c.reason, previous=c.old,
                          latency_ms=None if h.latency is None else round(h.latency * 1000, 3))
        elif c.kind == "down":
            self.log.warn("backend_down", **common, reason=c.reason, previous=c.old,
                          kind="dead" if c.dead else "unready", failures=h.failures,
                          held_out_s=None if h.held_until is None else round(h.held_until - time.monotonic(), 1))
        elif c.kind == "held":
            self.log.warn("backend_held_out", **common, reason="flapping", flaps=h.flaps,
                          until_s=round(float(c.new) - time.monotonic(), 1))
        else:
            self.log.info("tier_change", **common, old=c.old, new=c.new, why=c.reason)

    # ---- confirmation ---------------------------------------------------------

    def start_confirm(self, backend: Backend, saw: str) -> None:
        self._confirming.add(backend)
        self._spawn(self._confirm(backend, saw), f"confirm {backend}")

    def _spawn(self, coro, what: str) -> asyncio.Task:
        """A background task that is kept referenced and whose failure is
        logged, never silently lost."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self.log.error("task_failed", task=what, error=f"{type(t.exception()).__name__}: {t.exception()}")

        task.add_done_callback(done)
        return task

    async def _confirm(self, backend: Backend, saw: str) -> None:
        t = self.by_backend.get(backend)
        # At least 4x the backend's latency, so that a far endpoint is not
        # judged by a near one's clock.
        timeout = max(self.config.probe.confirm_timeout, 4 * ((t.health.latency if t else None) or 0))
        rto_ms = self.syn_rto().get(backend)
        try:
            result = await confirm(backend, timeout, self._confirm_tls,
                                   connect_timeout=None if rto_ms is None else confirm_connect_ms(rto_ms) / 1000)
            self.results.put_nowait((backend, result, saw))
        finally:
            self._confirming.discard(backend)
