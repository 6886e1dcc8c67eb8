"""Kernel data paths behind one interface (see base.py); `choose` picks one."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from dataclasses import dataclass

from prism_kernel.datapath.base import (
    BackendCounters,
    Datapath,
    DatapathSettings,
    KernelState,
)
from prism_kernel.errors import ConfigError, DatapathUnavailable, PrismError

__all__ = ["BackendCounters", "Datapath", "DatapathSettings", "KernelState", "datapath_class", "choose",
           "decide", "Choice", "installed", "ALL", "known_families"]

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


def known_families(families: Iterable[int | None], discovery: bool) -> frozenset[int] | None:
    """The address families the backends will have, when the configuration
    alone says so (every endpoint a literal address, no discovery); None when
    names or discovery leave it to run time."""
    fams = list(families)
    if discovery or not fams or None in fams:
        return None
    return frozenset(f for f in fams if f is not None)


def _unservable(cls: type[Datapath], families: frozenset[int] | None) -> bool:
    return families is not None and not (families & cls.families)


def _families_text(families: frozenset[int]) -> str:
    return "/".join(f"IPv{f}" for f in sorted(families))


def decide(requested: str, settings: DatapathSettings, families: frozenset[int] | None = None) -> Choice:
    """The data path to use, why, and what was found. `auto` keeps the data
    path this instance already has in the kernel (install() adopts it without
    loading anything): a restart never switches paths, nor flips the host
    sysctls the nftables path sets, whatever a fresh check would say today.
    Otherwise it prefers eBPF (no NAT, no conntrack, no per-packet work) and
    falls back to nftables. An explicit request is checked unless that data
    path is the one installed. DatapathUnavailable when nothing can run.

    `families` (known_families(), None: not known before run time): the data
    path must be able to steer to at least one of them, or the node would
    serve nothing: ConfigError (exit 2), never a fallback to a path that
    cannot serve the endpoints."""
    present = installed(settings)
    if families is not None:
        _refuse_unservable(requested, present, families)
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
        if _unservable(cls, families):
            assert families is not None
            raise ConfigError(
                f"datapath 'auto' (--datapath): every endpoint is {_families_text(families)}, which only the "
                f"eBPF data path steers, and eBPF cannot run here ({ebpf_missing.reason}); nftables steers "
                f"{_families_text(cls.families)} only: give an IPv4 endpoint or make eBPF available") from None
        cls.check_available(settings)
        return Choice(cls, f"auto: {ebpf_missing.reason}; using nftables", None, "ebpf", ebpf_missing.reason)


def _refuse_unservable(requested: str, present: tuple[str, str] | None, families: frozenset[int]) -> None:
    """ConfigError when the data path that would be used (the requested one,
    or under `auto` the installed one, which `auto` keeps) cannot steer to any
    of `families`. The data path's class is looked up, nothing is loaded."""
    name = requested if requested != "auto" else (present[0] if present else None)
    if name is None:
        return  # auto with nothing installed: decide() prefers eBPF, and refuses nftables below
    cls = datapath_class(name)
    if not _unservable(cls, families):
        return
    how = (f"datapath {requested!r} (--datapath)" if requested != "auto" else
           f"datapath 'auto' (--datapath) keeps the installed {name} data path ({present[1] if present else ''}), which")
    raise ConfigError(f"{how} steers {_families_text(cls.families)} only, and every endpoint is "
                      f"{_families_text(families)}: nothing could be steered; give an IPv4 endpoint, or use "
                      "datapath ebpf" + ("" if requested != "auto" else " (`prism-kernel cleanup` first)"))


def choose(requested: str, settings: DatapathSettings,
           families: frozenset[int] | None = None) -> tuple[type[Datapath], str]:
    """decide() as (class, why)."""
    c = decide(requested, settings, families)
    return c.cls, c.why
