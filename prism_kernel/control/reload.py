"""SIGHUP: re-read the configuration, diff it against the running one,
validate, and swap what changed. A valid one applies without a gap in
service (the kernel keeps steering with the current set until the new one is
written); an invalid one is rejected and the running one stays. The data
path's swap is a request to the writer (control/sync.py), like every kernel
operation."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from prism_kernel.config import Config
from prism_kernel.datapath import DatapathSettings, choose, known_families, listeners
from prism_kernel.errors import ConfigError, PrismError, describe
from prism_kernel.observe.metrics import MetricsServer

if TYPE_CHECKING:
    from prism_kernel.control.supervisor import Daemon

# Sections whose change needs a new data-path object (installed in place).
DATAPATH_SECTIONS = {"port", "datapath", "nftables", "ebpf"}


def settings_of(config: Config) -> DatapathSettings:
    return DatapathSettings(
        listen_port=config.port,
        instance=config.instance,
        nft_stable_tcp_timestamps=config.nftables.stable_tcp_timestamps,
        ebpf_loader=config.ebpf.loader,
    )


def _read(d: Daemon) -> Config | None:
    """The new configuration, or None (logged) when there is none to apply."""
    if d.reload_config is None:
        d.log.warn("reload_unsupported")
        return None
    try:
        new = d.reload_config()
    except ConfigError as e:
        d.log.error("reload_rejected", reason=str(e), kept="running configuration")
        return None
    except Exception as e:  # noqa: BLE001 - a reload must never stop the daemon
        d.log.error("reload_rejected", reason=f"{type(e).__name__}: {e}", kept="running configuration")
        return None
    old = d.config
    if new.instance != old.instance or new.state_dir != old.state_dir:
        d.log.error("reload_rejected", reason="instance and run_dir name the lock and the kernel state; "
                    "they cannot change on reload, restart the daemon", kept="running configuration")
        return None
    return new


async def reload(d: Daemon) -> None:
    new = _read(d)
    if new is None:
        return
    old = d.config
    changed = [k for k in type(new).model_fields if getattr(new, k) != getattr(old, k)]
    if not changed:
        d.log.info("reloaded", changed="nothing")
        return
    if "port" in changed and not await _listen_address_free(d, new):
        return
    if DATAPATH_SECTIONS & set(changed):
        new_settings = settings_of(new)
        w = d.writer
        families = known_families((e.family for e in new.endpoints), new.discovery.enabled)
        try:
            dp_cls, why = await w.run(w.query, choose, new.datapath, new_settings, families)
            current = d.selection.backends if d.selection else ()
            # On the writer thread: the new object is installed with the
            # current set (port / table replaced in place), then the old one
            # is closed; no write of the old one can come in between.
            info = await w.run(w.swap_datapath, dp_cls, new_settings, current)
        except Exception as e:  # noqa: BLE001 - a reload must never stop the daemon
            reason = describe(e)
            d.log.error("reload_rejected", reason=f"data path: {reason}", kept="running configuration")
            return
        d.datapath, d.dp_cls, d.datapath_reason, d.settings = info, dp_cls, why, new_settings
        w.set_reader(dp_cls, new_settings)
    if "metrics" in changed:
        reload_metrics(d, old, new)
    d.config = d.targets.config = new
    d.log.fmt = new.log_format
    if "probe" in changed:
        await d.targets.use_probe_config(new.probe)
    if "discovery" in changed or ("port" in changed and d.watcher is not None):
        await d.stop_discovery()
        d.watcher = d.make_watcher(new)
        if d.watcher is None:
            d.targets.discovered = []
        d.start_discovery()
    if {"endpoints", "discovery"} & set(changed):
        d.targets.keep_only_current_specs()
        await d.targets.resolve_all()
    if d.select() or {"port", "datapath"} & set(changed):
        d.apply(force=True)
    d.log.info("reloaded", changed=",".join(changed))
    d.write_state()


async def _listen_address_free(d: Daemon, new: Config) -> bool:
    """A new port someone else listens on is rejected (issue 12), unless the
    new configuration says to take it over; the running port stays."""
    try:
        why, found = await d.writer.run(d.writer.query, listeners.check, new.port, new.take_over_listen_address)
    except Exception as e:  # noqa: BLE001 - the check is a guard: logged, the reload goes on
        d.log.warn("listen_address_unchecked", port=new.port, error=f"{type(e).__name__}: {e}")
        return True
    if why:
        d.log.error("reload_rejected", reason=why, kept="running configuration")
        return False
    others = listeners.foreign(found, os.getpid())
    if others:
        d.log.warn("listen_address_taken_over", port=new.port, listeners=listeners.describe(others),
                   reason="take_over_listen_address")
    return True


def reload_metrics(d: Daemon, old: Config, new: Config) -> None:
    """Apply a changed `metrics` section: rebind the server when its
    address, port or on/off changed; on a bind error keep the old one."""
    if d.metrics is None:
        if new.metrics.enabled:
            d.log.warn("reload_partial", reason="metrics were off at start; restart the daemon to serve them")
        return
    d.metrics.heartbeat_timeout = new.metrics.heartbeat_timeout
    where = lambda m: (m.enabled, m.address, m.port)  # noqa: E731
    if where(old.metrics) == where(new.metrics):
        return
    old_server = d.metrics_server
    if old_server is not None:
        old_server.stop()
    d.metrics_server = None
    if new.metrics.enabled:
        server = MetricsServer(d.metrics, new.metrics.address, new.metrics.port, log=d.log)
        try:
            server.listen()  # one attempt: a held address keeps the old one (start() would retry)
        except PrismError as e:
            d.log.error("reload_partial", reason=str(e), kept="the previous metrics address")
            if old_server is not None:
                old_server.start()
                d.metrics_server = old_server
            return
        d.metrics_server = server
