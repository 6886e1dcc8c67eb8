"""Kernel data paths behind one interface (see base.py); `choose` picks one."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

from prism_kernel.datapath.base import (
    BackendCounters,
    Datapath,
    DatapathSettings,
    KernelState,
)
from prism_kernel.errors import DatapathUnavailable, PrismError

__all__ = ["BackendCounters", "Datapath", "DatapathSettings", "KernelState", "datapath_class", "choose",
           "decide", "Choice", "installed", "ALL"]

ALL = ("ebpf", "nftables")
_MODULES = {"ebpf": ("prism_kernel.datapath.ebpf.datapath", "EbpfDatapath"), "nftables": ("prism_kernel.datapath.nft.datapath", "NftablesDatapath")}


def datapath_class(name: str) -> type[Datapath]:
    """Import lazily: the nftables path must work where bcc is missing, and
    the reverse."""
    module, cls = _MODULES[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise DatapathUnavailable(name, f"cannot load its module: {e}") from None


def _ebpf_attached_hooks(instance: str) -> list[str]:
    """Hooks whose pinned link of this instance is attached (a link detached
    behind our back keeps its pin but has no cgroup). bpf(2) only: no
    compile, no loader, no map read."""
    from prism_kernel.datapath.ebpf import bpfsys as bpf  # noqa: PLC0415
    from prism_kernel.datapath.ebpf import datapath as ebpf  # noqa: PLC0415

    links = os.path.join(ebpf.BPFFS, instance, "links")
    if not os.path.isdir(links):
        return []
    attached = []
    for hook, _ in ebpf.HOOKS:
        try:
            fd = bpf.obj_get(os.path.join(links, hook))
        except OSError:
            continue
        try:
            if bpf.link_info(fd).cgroup_id != 0:
                attached.append(hook)
        except OSError:
            pass
        finally:
            os.close(fd)
    return attached


def _nft_table_exists(instance: str) -> str | None:
    from prism_kernel.datapath.nft import datapath as nftables  # noqa: PLC0415

    nft = nftables._new_nft()
    table = nftables.table_name(instance)
    return f"{nftables.FAMILY} {table}" if table in nftables._table_names(nft) else None


def installed(settings: DatapathSettings) -> tuple[str, str] | None:
    """(data path, evidence) when this instance's data path is already in the
    kernel: eBPF when one of its pinned links is attached, else nftables when
    its table exists; None when neither (or when it cannot be told). Cheap:
    a few bpf(2) calls and one `nft list tables`, nothing compiled or loaded."""
    try:
        hooks = _ebpf_attached_hooks(settings.instance)
    except (PrismError, OSError, ImportError):
        hooks = []
    if hooks:
        return "ebpf", f"its pinned links are attached ({', '.join(hooks)})"
    try:
        table = _nft_table_exists(settings.instance)
    except (PrismError, OSError, ImportError):
        table = None
    if table:
        return "nftables", f"its nft table {table} exists"
    return None


@dataclass(frozen=True)
class Choice:
    cls: type[Datapath]
    why: str
    # (data path, evidence) of this instance's state found in the kernel
    installed: tuple[str, str] | None = None
    # the data path `auto` preferred but found unavailable (then `unavailable` says why)
    fell_back_from: str | None = None
    unavailable: str | None = None


def decide(requested: str, settings: DatapathSettings) -> Choice:
    """The data path to use, why, and what was found. `auto` keeps the data
    path this instance already has in the kernel (install() adopts it without
    loading anything): a restart never switches paths, nor flips the host
    sysctls the nftables path sets, whatever a fresh check would say today.
    Otherwise it prefers eBPF (no NAT, no conntrack, no per-packet work) and
    falls back to nftables. An explicit request is checked unless that data
    path is the one installed. DatapathUnavailable when nothing can run."""
    present = installed(settings)
    if requested != "auto":
        cls = datapath_class(requested)
        if present and present[0] == requested:
            return Choice(cls, f"requested; installed: {present[1]}", present)
        cls.check_available(settings)
        return Choice(cls, "requested", present)
    if present:
        name, evidence = present
        return Choice(datapath_class(name), f"auto: keeping the installed {name} data path ({evidence}); "
                                            "`prism-kernel cleanup` and a restart choose again", present)
    try:
        cls = datapath_class("ebpf")
        cls.check_available(settings)
        return Choice(cls, "auto: eBPF available")
    except DatapathUnavailable as ebpf_missing:
        cls = datapath_class("nftables")
        cls.check_available(settings)
        return Choice(cls, f"auto: {ebpf_missing.reason}; using nftables", None, "ebpf", ebpf_missing.reason)


def choose(requested: str, settings: DatapathSettings) -> tuple[type[Datapath], str]:
    """decide() as (class, why)."""
    c = decide(requested, settings)
    return c.cls, c.why
