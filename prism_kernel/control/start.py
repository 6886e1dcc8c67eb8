"""Starting the data path: never a crash loop, never a flip (issue 9).

* `auto` keeps the data path this instance already has in the kernel
  (datapath.decide); nothing is compiled or loaded to adopt a current one.
* When choosing or installing fails, the daemon stays up and tries again
  after 1 s, doubling to 60 s (jittered), logging each failure
  (`datapath_start_failed`), counting it (metrics) and showing it in
  `status`, while whatever the kernel holds keeps steering. It probes all
  along, so the first write after a success uses fresh health.
* Under `auto`, a failed eBPF install falls back to nftables at once
  (`datapath_fallback`), but only when nothing of this instance was in the
  kernel: an installed eBPF path is never switched away from, and the host
  sysctls the nftables path sets are never touched for it.

Every kernel call here (decide, installed, check_available, install) runs
on the writer thread (control/sync.py): the event loop keeps probing,
confirming and serving /healthz while an install loads programs.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from prism_kernel.control import sdnotify
from prism_kernel.datapath import Choice, Datapath, datapath_class, decide, installed, known_families, listeners
from prism_kernel.errors import ConfigError, PrismError, describe

if TYPE_CHECKING:
    from prism_kernel.control.supervisor import Daemon

# Retrying a data-path start that failed: 1 s, doubling to 60 s, each +-20 %.
START_RETRY_MIN = 1.0
START_RETRY_MAX = 60.0
START_RETRY_JITTER = 0.2


def start_retry_delay(failures: int, rand: Callable[[float, float], float] = random.uniform) -> float:
    """Seconds to wait after the `failures`-th consecutive failed start."""
    base = min(START_RETRY_MAX, START_RETRY_MIN * 2 ** max(0, failures - 1))
    return min(START_RETRY_MAX, base * rand(1 - START_RETRY_JITTER, 1 + START_RETRY_JITTER))


class Starter:
    """Choose, install (or adopt) and write the first set, with backoff and
    the one fallback `auto` allows."""

    def __init__(self, d: Daemon):
        self.d = d
        self.choice: Choice | None = None
        self._listen_checked = False

    def _use(self, cls: type[Datapath], why: str) -> None:
        d = self.d
        d.dp_cls, d.datapath_reason = cls, why
        d.writer.set_reader(cls, d.settings)

    def fell_back(self, frm: str, to: str, reason: str, error: str) -> None:
        d = self.d
        d.stats.fallback = f"{frm} -> {to}: {error}"
        d.log.warn("datapath_fallback", **{"from": frm, "to": to}, reason=reason, error=error)
        if d.metrics is not None:
            d.metrics.observe_datapath_fallback(frm, to, reason)

    async def check_listen_address(self) -> None:
        """Never take over someone else's port (issue 12): a process listening
        on 127.0.0.1:PORT or [::1]:PORT ends the start with a ConfigError
        (exit 2, naming it) before anything is written to the kernel, unless
        take_over_listen_address; then it is logged. A check that cannot run
        is logged and the start goes on (never a crash loop)."""
        d = self.d
        try:
            why, found = await d.writer.run(d.writer.query, listeners.check, d.config.port,
                                            d.config.take_over_listen_address)
        except Exception as e:  # noqa: BLE001 - the check is a guard, not a dependency
            d.log.warn("listen_address_unchecked", port=d.config.port, error=describe(e))
            return
        if why:
            raise ConfigError(why)
        others = listeners.foreign(found, os.getpid())
        if others:
            d.log.warn("listen_address_taken_over", port=d.config.port, listeners=listeners.describe(others),
                       reason="take_over_listen_address")

    async def choose(self) -> bool:
        """decide() until it finds a data path (retrying with backoff); False
        when stopped first. A configuration no data path here can serve is a
        ConfigError (exit 2), not retried."""
        d = self.d
        if not self._listen_checked:
            await self.check_listen_address()  # once, before the first kernel write
            self._listen_checked = True
        families = known_families((e.family for e in d.config.endpoints), d.config.discovery.enabled)
        while not d.stopping:
            try:
                choice = await d.writer.run(d.writer.query, decide, d.config.datapath, d.settings, families)
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001 - never a crash loop: retried
                await self._failed("choose", d.config.datapath, e)
                continue
            self.choice = choice
            self._use(choice.cls, choice.why)
            if choice.fell_back_from is not None:
                self.fell_back(choice.fell_back_from, choice.cls.name, "unavailable", choice.unavailable or "")
            return True
        return False

    async def start(self) -> bool:
        """Install (or adopt) the chosen data path and write the first set,
        retrying with backoff until it works; False when stopped first."""
        d = self.d
        while not d.stopping:
            if d.dp_cls is None and not await self.choose():
                return False
            cls = d.dp_cls
            assert cls is not None and self.choice is not None
            failed = cls.name
            try:
                await self._install_and_write(cls)
                return True
            except Exception as e:  # noqa: BLE001 - never a crash loop: retried or fallen back
                error = e
            if await self._may_fall_back(cls):
                self.fell_back(cls.name, "nftables", "install_failed", describe(error))
                try:
                    nft = datapath_class("nftables")
                    await d.writer.run(d.writer.query, nft.check_available, d.settings)
                    self._use(nft, f"auto: eBPF install failed ({describe(error)}); using nftables")
                    await self._install_and_write(nft)
                    return True
                except Exception as e:  # noqa: BLE001
                    failed, error = "nftables", e
            await self._failed("install", failed, error)
            if self.choice.installed is None:
                d.dp_cls = None  # nothing of ours in the kernel: choose afresh next time
        return False

    async def _may_fall_back(self, failed: type[Datapath]) -> bool:
        """Only `auto`, only from eBPF, and only when this instance had no data
        path in the kernel before the attempt, nor has one attached after it:
        an installed eBPF path is never switched away from."""
        d = self.d
        if d.config.datapath != "auto" or failed.name != "ebpf" or self.choice is None:
            return False
        if self.choice.installed is not None:
            return False
        now = await d.writer.run(d.writer.query, installed, d.settings)
        return now is None or now[0] != "ebpf"

    async def _install_and_write(self, cls: type[Datapath]) -> None:
        """install() (which adopts a current installed path without loading
        anything), then the first set written; d.datapath only on success."""
        d = self.d
        d.dp_cls = cls
        d.select()
        assert d.selection is not None
        backends = d.selection.backends
        if not backends:
            raise PrismError(
                f"no endpoint has an address the {cls.name} data path can steer to "
                f"(it steers IPv{'/IPv'.join(map(str, sorted(cls.families)))}); "
                f"known addresses: {', '.join(map(str, d.targets.by_backend)) or 'none'}")
        sdnotify.notify(STATUS=f"installing the {cls.name} data path")
        d.writer.want(None, syn_rto=d.syn_rto())  # the first set goes in with its timers
        started = await d.writer.run(d.writer.start_datapath, cls, d.settings, backends)
        d.datapath = started.info
        if started.wrote:
            d.record_write(backends, started.seconds)
        d.applied = backends
        d.stats.start_failures_in_a_row = 0
        d.stats.next_start_attempt_wall = None
        loaded = started.info.last_load
        d.log.info("datapath_ready", datapath=cls.name, adopted=started.adopted,
                   **{k: loaded[k] for k in ("loader", "why", "load_s", "maxrss_kb") if k in loaded})
        # Before READY, as the kernel must not steer through both data paths.
        await d.writer.run(d.writer.remove_others, cls.name, d.settings)

    async def _failed(self, stage: str, datapath: str, error: BaseException) -> None:
        """Log, count and show a failed start, then wait (probing) before the next try."""
        d = self.d
        st = d.stats
        st.start_failures += 1
        st.start_failures_in_a_row += 1
        delay = start_retry_delay(st.start_failures_in_a_row)
        st.last_start_error = f"{stage} {datapath}: {describe(error)}"
        st.last_start_failure_wall = time.time()
        st.next_start_attempt_wall = time.time() + delay
        try:
            present = await d.writer.run(d.writer.query, installed, d.settings)
        except Exception:  # noqa: BLE001 - only for the log line
            present = None
        d.log.error("datapath_start_failed", stage=stage, datapath=datapath, error=describe(error),
                    attempt=st.start_failures_in_a_row, retry_in_s=round(delay, 2),
                    kernel=(f"the installed {present[0]} data path keeps steering ({present[1]})"
                            if present else "nothing of this instance in the kernel"))
        if d.metrics is not None:
            d.metrics.observe_datapath_start_failure(stage)
        d.write_state()
        sdnotify.notify(STATUS=f"data path start failed {st.start_failures_in_a_row}x ({stage} {datapath}: "
                               f"{describe(error)}); retrying in {delay:.0f}s")
        await d.pause_starting(delay)
