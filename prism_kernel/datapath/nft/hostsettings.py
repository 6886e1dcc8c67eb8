"""The host-wide sysctls the nftables data path needs while its table is
installed. Saved before the first change and restored by cleanup once no
prism-kernel table needs them (prism_kernel.datapath.sysctl)."""

from __future__ import annotations

import logging
import os

from prism_kernel.datapath import sysctl
from prism_kernel.datapath.base import DatapathSettings
from prism_kernel.errors import DatapathError

log = logging.getLogger("prism_kernel.datapath.nft")

ROUTE_LOCALNET = "net.ipv4.conf.all.route_localnet"
TCP_TIMESTAMPS = "net.ipv4.tcp_timestamps"
# (name, value, only changed from these values; () = always), in the order
# they are applied.
# - route_localnet=1: a DNAT from 127.0.0.1 to a remote address is martian without it.
# - tcp_timestamps 1 -> 2: one timestamp clock per host instead of one per
#   connection; with SNAT, backends otherwise drop reconnecting SYNs in
#   TIME_WAIT (nft/README.md, "Why connection churn was slow"). An operator's
#   0 or 2 is left alone.
SYSCTLS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (ROUTE_LOCALNET, "1", ()),
    (TCP_TIMESTAMPS, "2", ("1",)),
)


def check_writable() -> str | None:
    """Why the knobs cannot be set here, or None."""
    for name, _, _ in SYSCTLS:
        knob = sysctl.PROC_SYS / name.replace(".", "/")
        if not knob.exists():
            return f"{knob} missing (no IPv4 in this kernel?)"
        if not os.access(knob, os.W_OK):
            return f"cannot write {knob}: needs root (CAP_NET_ADMIN) and a writable /proc/sys"
    return None


def ensure(settings: DatapathSettings, stable_timestamps: bool, warned: set[str]) -> None:
    """Set the knobs (saving the old values first). `warned` keeps one
    warning per knob an operator set otherwise."""
    for name, value, only_from in SYSCTLS:
        if name == TCP_TIMESTAMPS and not stable_timestamps:
            continue
        current = sysctl.read(name)
        if only_from and current not in only_from and current != value:
            if name not in warned:
                warned.add(name)
                log.warning("%s=%s left as set by the operator; with SNAT, reconnects may "
                            "stall on SYN retransmits (see nft/README.md)", name, current)
            continue
        if sysctl.ensure(settings.instance, name, value):
            log.info("set %s=%s (previous value %s saved in %s)", name, value, current,
                     sysctl.state_path(settings.instance))


def current() -> dict[str, str]:
    """The knobs' values for status, by short name ("?" when unreadable)."""
    out = {}
    for name, _, _ in SYSCTLS:
        try:
            out[name.rsplit(".", 1)[-1]] = sysctl.read(name)
        except DatapathError:
            out[name.rsplit(".", 1)[-1]] = "?"
    return out
