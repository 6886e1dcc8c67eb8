"""The data-path interface: what the daemon asks of the kernel.

Two implementations: `nftables` (DNAT map) and `ebpf` (cgroup connect4/6
rewrite). Both are driven by one writer (the daemon) and keep steering when
that writer is gone: kernel state outlives the process on purpose.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from prism_kernel.core.model import Backend


@dataclass(frozen=True)
class DatapathSettings:
    """What a data path needs to know; derived from the daemon's config."""

    listen_port: int = 7445
    # Names every piece of kernel state (nft table, BPF pin dir, run dir), so
    # that a test instance never touches a live daemon's state.
    instance: str = "prism-kernel"
    # nftables only: set net.ipv4.tcp_timestamps 1 -> 2 while installed (one
    # timestamp clock per host); without it, SNAT makes backends drop
    # reconnecting SYNs in TIME_WAIT (nft/README.md).
    nft_stable_tcp_timestamps: bool = True
    # eBPF only: libbpf (the precompiled object), bcc (compile at run time),
    # or auto (libbpf, else bcc); see ebpf.loader_plan.
    ebpf_loader: str = "auto"


@dataclass
class BackendCounters:
    """Per-backend counters the kernel keeps (where the data path has them)."""

    connections: int = 0
    extra: dict[str, int] = field(default_factory=dict)


@dataclass
class PassiveCounts:
    """What the kernel saw of steered connects to one backend (cumulative
    since the data path was installed; the daemon works with differences)."""

    refused: int = 0  # SYN answered by RST: SYN_SENT -> CLOSE
    syn_timeouts: int = 0  # SYN retransmit timer fired in SYN_SENT (black hole)
    established: int = 0  # handshakes completed


@dataclass
class KernelState:
    """What the kernel really holds, for `status`. Read without the daemon."""

    datapath: str
    installed: bool
    backends: tuple[Backend, ...] = ()
    counters: dict[Backend, BackendCounters] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


class Datapath(ABC):
    name: ClassVar[str]
    # Address families of backends this data path can steer to; the daemon
    # selects only among these (nftables: IPv4 only, there is no IPv6
    # route_localnet).
    families: ClassVar[frozenset[int]] = frozenset({4, 6})
    # Whether set_syn_rto() reaches the kernel (eBPF: per steered connect);
    # where it does not, steered connects keep the kernel's 1 s.
    sets_syn_rto: ClassVar[bool] = False

    def __init__(self, settings: DatapathSettings):
        self.settings = settings

    @classmethod
    @abstractmethod
    def check_available(cls, settings: DatapathSettings) -> None:
        """Raise DatapathUnavailable with the reason when it cannot run here.
        Touches nothing in the kernel."""

    @abstractmethod
    def install(self, initial: Sequence[Backend]) -> bool:
        """Create the data path with `initial` as the backend set, or adopt the
        one an earlier daemon left (without a gap in service; `initial` is then
        not written: the next apply() converges). Returns True when adopted."""

    @abstractmethod
    def apply(self, backends: Sequence[Backend]) -> bool:
        """Make the kernel steer to exactly `backends` (non-empty, may mix
        families; each family goes to the listener that can reach it). One
        atomic change; nothing written when the kernel already holds this set.
        Returns True when the kernel was written."""

    def set_syn_rto(self, syn_rto_ms: Mapping[Backend, int]) -> None:
        """The initial SYN retransmission timeout (ms) of connects steered to
        each backend (prism_kernel.core.rto); a backend not in it keeps the
        kernel default (1 s). Written with the set by the next apply() /
        install(), also when only the timeouts changed. Where a data path
        cannot set a per-connection timeout (nftables), ignored."""

    @abstractmethod
    def read_state(self) -> KernelState:
        """What the kernel holds now (backends, counters, ids)."""

    def close_connections(self, backends: Sequence[Backend]) -> int:
        """Abort every connection this data path steered to `backends`,
        including sockets still in SYN_SENT, so that clients fail fast and
        retry onto a healthy backend (sock_diag SOCK_DESTROY, as `ss -K`;
        nftables also deletes their conntrack entries). Never touches other
        traffic to the same addresses. Returns how many sockets were aborted."""
        return 0

    def passive_failures(self) -> dict[Backend, PassiveCounts]:
        """Per-backend outcome counters of steered connects, observed in the
        kernel (eBPF: a sock_ops program). Empty where the data path cannot
        observe them."""
        return {}

    def close(self) -> None:
        """Release file descriptors; leave the kernel state in place."""

    @classmethod
    @abstractmethod
    def cleanup(cls, settings: DatapathSettings) -> list[str]:
        """Remove everything this data path created for `settings.instance`
        (and restore sysctls it changed). Idempotent; works with no daemon and
        no prior install(). Returns a line per thing removed."""


def import_netlink():
    """prism_kernel.datapath.netlink.sockets (sock_diag), imported on first
    use: it loads pyroute2 (~10 MB, ~90 ms), which only closing connections
    needs."""
    try:
        from prism_kernel.datapath.netlink import sockets as _netlink  # noqa: PLC0415
    except ImportError as e:
        from prism_kernel.errors import DatapathError

        raise DatapathError(f"pyroute2 is needed to close connections: {e}") from e
    return _netlink
