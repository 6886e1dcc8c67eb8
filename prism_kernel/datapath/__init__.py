"""Kernel data paths behind one interface (see base.py); `choose` picks one."""

from __future__ import annotations

import importlib

from prism_kernel.datapath.base import (
    BackendCounters,
    Datapath,
    DatapathSettings,
    KernelState,
)
from prism_kernel.errors import DatapathUnavailable

__all__ = ["BackendCounters", "Datapath", "DatapathSettings", "KernelState", "datapath_class", "choose", "ALL"]

ALL = ("ebpf", "nftables")
_MODULES = {"ebpf": ("prism_kernel.datapath.ebpf", "EbpfDatapath"), "nftables": ("prism_kernel.datapath.nftables", "NftablesDatapath")}


def datapath_class(name: str) -> type[Datapath]:
    """Import lazily: the nftables path must work where bcc is missing, and
    the reverse."""
    module, cls = _MODULES[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise DatapathUnavailable(name, f"cannot load its module: {e}") from None


def choose(requested: str, settings: DatapathSettings) -> tuple[type[Datapath], str]:
    """The data path class to use and why. `auto` prefers eBPF (no NAT, no
    conntrack, no per-packet work) and falls back to nftables."""
    if requested != "auto":
        cls = datapath_class(requested)
        cls.check_available(settings)
        return cls, "requested"
    try:
        cls = datapath_class("ebpf")
        cls.check_available(settings)
        return cls, "auto: eBPF available"
    except DatapathUnavailable as ebpf_missing:
        cls = datapath_class("nftables")
        cls.check_available(settings)
        return cls, f"auto: {ebpf_missing.reason}; using nftables"
