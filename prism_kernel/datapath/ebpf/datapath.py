"""The eBPF data path: cgroup sock_addr programs at the cgroup v2 root rewrite
connect() to 127.0.0.1:PORT / [::1]:PORT / [::ffff:127.0.0.1]:PORT into a
connect() to a healthy API server, in the host network namespace only; the
getpeername hooks make a steered socket report the address it connected to;
a sock_ops program follows steered sockets through their handshake.

Design: docs/design/ebpf-datapath.md (process split, install / adopt /
upgrade, fast failover), docs/design/ebpf-update-protocol.md (how a set is
written under running connects), docs/design/ebpf-program.md (the programs).
The modules: maps.py (map layout, encodings, reads and writes), links.py
(bpffs pins, cgroup links), loading.py (which loader, the loader child),
availability.py (can it run here), failover.py (steered sockets), and this
class, which puts them together behind the Datapath interface.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from prism_kernel.core import ebpf_plan as plan
from prism_kernel.core.model import Backend
from prism_kernel.core.rto import ms_to_jiffies
from prism_kernel.datapath.base import (
    BackendCounters,
    Datapath,
    DatapathSettings,
    KernelState,
    PassiveCounts,
)
from prism_kernel.datapath.ebpf import bpfsys as bpf
from prism_kernel.datapath.ebpf import availability, failover, loading
from prism_kernel.datapath.ebpf import links as links_mod
from prism_kernel.datapath.ebpf import maps as pkmaps
from prism_kernel.datapath.ebpf.cgroup import find_cgroup2_root
from prism_kernel.datapath.ebpf.jiffies import kernel_hz
from prism_kernel.datapath.ebpf.links import (
    BPFFS,
    HOOKS,
    Paths,
    close_quietly,
    ensure_bpffs,
    remove_pins,
    validate_instance,
)
from prism_kernel.datapath.ebpf.loading import (
    LOADER_CODES,
    LOADER_NAMES,
    bcc_missing,
    default_object,
    default_source,
    libbpf_missing,
    loader_plan,
)
from prism_kernel.datapath.ebpf.maps import (
    LAYOUT,
    MAX_BACKENDS,
    MAX_PASSIVE,
    SUSPECT_NS,
    SUSPECT_WINDOW_S,
    Maps,
    decode_backend,
    encode_backend,
    host_netns_cookie,
)
from prism_kernel.errors import DatapathError

log = logging.getLogger(__name__)
_F = TypeVar("_F", bound=Callable[..., Any])


def _kernel_errors(fn: _F) -> _F:
    """The interface's boundary: a bpf(2) call that fails is a DatapathError
    (the daemon handles those), never a raw OSError."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except OSError as e:
            raise DatapathError(f"eBPF {fn.__name__}: {e}") from e
    return wrapper  # type: ignore[return-value]


class EbpfDatapath(Datapath):
    name: ClassVar[str] = "ebpf"
    sets_syn_rto: ClassVar[bool] = True

    def __init__(self, settings: DatapathSettings, *, source: str | Path | None = None,
                 obj: str | Path | None = None, layout: int = LAYOUT):
        """`source`, `obj` and `layout` exist for tests of the upgrade path (a
        changed program, a changed map layout); the daemon uses the defaults."""
        super().__init__(settings)
        validate_instance(settings.instance)
        self.source = Path(source) if source is not None else default_source()
        self.obj = Path(obj) if obj is not None else default_object()
        self.layout = layout
        self.paths = Paths(settings.instance, layout)
        self._maps: Maps | None = None
        self._links: dict[str, int] = {}
        self._cgroup_root: str | None = None
        self._pending: dict[str, int] | None = None  # staged prog fds of a deferred upgrade
        self._pending_meta: tuple[bytes, str] = (b"", "")
        self.upgrade_error: str | None = None  # install() kept an older program (same layout)
        self._hashes: dict[bytes, str] | None = None
        self._ncpus = bpf.possible_cpus()
        self.last_load: dict[str, Any] = {}
        self._syn_rto_ms: dict[Backend, int] = {}

    # --- availability ----------------------------------------------------

    @classmethod
    def check_available(cls, settings: DatapathSettings) -> None:
        """availability.check_available: touches nothing in the kernel."""
        availability.check_available(cls.name, settings)

    @classmethod
    def check_load(cls, settings: DatapathSettings) -> dict:
        """availability.check_load: whether this kernel's verifier accepts the programs."""
        return availability.check_load(cls.name, settings)

    # --- what is attached, and what would be ------------------------------

    def _program_hash(self, loader: str, input_sha256: str | None = None) -> bytes:
        """What a load by `loader` would attach: its input (the object or the
        source; `input_sha256` when the loader says what it read) with the
        parameters. The meta map keeps the attached one's."""
        if input_sha256 is None:
            try:
                input_sha256 = hashlib.sha256(
                    (self.obj if loader == "libbpf" else self.source).read_bytes()).hexdigest()
            except OSError:
                return b"\0" * 32  # nothing to load: matches no attached program
        h = hashlib.sha256()
        h.update(b"prism-kernel ebpf\0" + loader.encode() + b"\0")
        h.update(struct.pack("=IIQ", self.layout, MAX_BACKENDS, SUSPECT_NS))
        h.update(bytes.fromhex(input_sha256))
        return h.digest()

    def _loaded_hash(self) -> bytes:
        """The hash of what the last load really loaded (the bytes the loader read)."""
        return self._program_hash(self.last_load["loader"], self.last_load.get("input_sha256"))

    def _current_hashes(self) -> dict[bytes, str]:
        """Hash -> loader, for each loader whose program would be current: an
        attached program of any of them is adopted, not reloaded. Read once
        (status and every metrics scrape ask)."""
        if self._hashes is None:
            loaders = LOADER_NAMES if self.settings.ebpf_loader == "auto" else (self.settings.ebpf_loader,)
            self._hashes = {self._program_hash(name): name for name in loaders}
        return self._hashes

    def _root(self) -> str:
        if self._cgroup_root is None:
            self._cgroup_root = find_cgroup2_root()
        return self._cgroup_root

    def _ensure_maps(self) -> Maps | None:
        if self._maps is None:
            self._maps = pkmaps.open_maps(self.paths.maps)
        return self._maps

    def _check_links(self) -> None:
        """Raise DatapathError when a hook is no longer attached, so that the
        daemon's reconcile reinstalls."""
        if self._pending is not None:
            return
        if not self._links:
            self._links = links_mod.open_links(self.paths)
        missing = links_mod.detached_hooks(self._links)
        if missing:
            raise DatapathError(f"eBPF hooks no longer attached: {', '.join(missing)} "
                                f"(detached behind the daemon's back); reinstall needed")

    def _write_meta(self, digest: bytes, loader: str) -> None:
        pkmaps.write_meta(self.paths.meta, digest, self.layout, LOADER_CODES.get(loader, 0))

    def _read_attached_set(self, links: dict[str, int]) -> list[Backend] | None:
        """The set the attached program steers to, read through its own maps;
        None when they cannot be read or have a format this code does not know."""
        return pkmaps.read_set_by_ids(links_mod.attached_prog_maps(links))

    # --- the backend set --------------------------------------------------

    def set_syn_rto(self, syn_rto_ms: Mapping[Backend, int]) -> None:
        """Datapath.set_syn_rto: kept here, written as jiffies into the slots
        by the next _write(). Values outside [1, 1000] ms are refused: the
        rule (core/rto.py) never asks for them and a timer above the kernel
        default is not what this is for."""
        for b, ms in syn_rto_ms.items():
            if not 1 <= ms <= 1000:
                raise DatapathError(f"backend {b}: initial SYN RTO {ms} ms out of range (1..1000)")
        self._syn_rto_ms = dict(syn_rto_ms)

    def _syn_rto_jiffies(self) -> dict[Backend, int]:
        """The RTOs to write, in this kernel's jiffies; none when HZ is
        unknown (every steered connect keeps the kernel default)."""
        hz = kernel_hz()
        if hz is None:
            if self._syn_rto_ms:
                log.warning("kernel HZ unknown: the initial SYN RTO stays the kernel default")
            return {}
        return {b: ms_to_jiffies(ms, hz) for b, ms in self._syn_rto_ms.items()}

    def _write(self, maps: Maps, backends: Sequence[Backend]) -> bool:
        """Plan the change to `backends` and run it; True when a set was committed."""
        current = pkmaps.live(maps)
        counters = pkmaps.backend_keys(maps.fds["pk_counters"], 4 * MAX_BACKENDS + 1)
        v4, v6 = plan.split_families(backends)
        outcomes: list[Backend] = []
        if (v4, v6) != (current.v4, current.v6):  # only then: up to MAX_PASSIVE syscalls
            outcomes = pkmaps.backend_keys(maps.fds["pk_passive"], MAX_PASSIVE + 1)
        ops = plan.plan_update(current, backends, counters, outcomes, MAX_PASSIVE,
                               self._syn_rto_jiffies())
        pkmaps.execute(maps, ops, self._ncpus)
        trimmed = sum(isinstance(op, plan.DeleteOutcomes) for op in ops)
        if trimmed:
            log.info("pk_passive %d/%d full: dropped the outcome counters of %d backends "
                     "outside the set", len(outcomes), MAX_PASSIVE, trimmed)
        committed = plan.commit_index(ops) is not None
        if committed:
            log.debug("backend set generation %d: %d IPv4, %d IPv6", current.seq + 1, len(v4), len(v6))
        return committed

    # --- loading and attaching ----------------------------------------------

    def _load(self) -> dict[str, int]:
        """Load in the child, with the loaders of loader_plan() in order;
        returns fds of the staged programs (pins removed again: the fds keep
        the programs alive). self.last_load says which loader and why."""
        stage = self.paths.stage()
        failures: list[str] = []
        for loader, why in loader_plan(self.settings.ebpf_loader, self.obj):
            remove_pins(stage)
            req = {"loader": loader, "mode": "load", "layout": self.layout,
                   "suspect_ns": SUSPECT_NS, "map_dir": self.paths.maps, "stage_dir": stage}
            req["object" if loader == "libbpf" else "source"] = str(
                self.obj if loader == "libbpf" else self.source)
            try:
                res = loading.run_loader(req, raise_on_error=False)
                if not res.get("ok"):
                    failures.append(f"{loader} ({res.get('stage')}): {res.get('error')}")
                    log.warning("eBPF loader %s failed at %s: %s", loader, res.get("stage"),
                                loading.last_lines(str(res.get("error")), 3))
                    continue
                res["why"] = why + (f" (after: {'; '.join(f[:200] for f in failures)})"
                                    if failures else "")
                self.last_load = res
                fds: dict[str, int] = {}
                try:
                    for hook, _ in HOOKS:
                        fds[hook] = bpf.obj_get(os.path.join(stage, hook))
                except OSError as e:
                    for fd in fds.values():
                        os.close(fd)
                    raise DatapathError(f"loader left no program {hook} in {stage}: {e}") from e
                return fds
            finally:
                remove_pins(stage)
        raise DatapathError("eBPF loader failed: " + " | ".join(failures))

    # --- the interface --------------------------------------------------------

    @_kernel_errors
    def install(self, initial: Sequence[Backend]) -> bool:
        """Adopt what is attached when it is current, else load and attach
        (fresh), or move the attached links to the new programs (upgrade):
        docs/design/ebpf-datapath.md."""
        plan.split_families(initial)  # refused before anything is touched
        self._root()
        ensure_bpffs()
        os.makedirs(self.paths.base, mode=0o700, exist_ok=True)
        for name in os.listdir(self.paths.base):  # stage dirs of a killed install
            if name.startswith("stage-"):
                remove_pins(os.path.join(self.paths.base, name))
        current = self._current_hashes()
        bpf.raise_memlock()  # kernels before 5.11 charge BPF maps to it

        self.close()
        self._links = links_mod.open_links(self.paths, drop_defunct=True)
        meta = pkmaps.read_meta(self.paths.meta)
        maps = self._ensure_maps()
        attached_ids = links_mod.attached_prog_maps(self._links)
        uses_these_maps = maps is not None and attached_ids.get("pk_commit") == maps.ids["pk_commit"]
        if (len(self._links) == len(HOOKS) and meta is not None and meta[0] in current
                and meta[1] == self.layout and uses_these_maps):
            if pkmaps.write_config(maps, self.settings.listen_port):
                log.info("adopted; config updated (listen port %d)", self.settings.listen_port)
            self.last_load = {"loader": current[meta[0]], "why": "adopted: the attached program "
                              "is current, nothing loaded"}
            log.info("adopted the attached eBPF data path in %s (loaded by %s)", self.paths.base,
                     current[meta[0]])
            return True

        had_links = bool(self._links)
        old_set = self._read_attached_set(self._links) if had_links else None
        new_dir = not os.path.isdir(self.paths.maps)
        carried = links_mod.carry_peers(self.paths, attached_ids) if had_links else None
        try:
            new_progs = self._load()
        except BaseException as e:
            # A failed install or upgrade leaves no new pin behind: the maps
            # dir this attempt created (the loader may have pinned maps before
            # a program failed to load), else the pk_peers pin it added.
            if new_dir:
                remove_pins(self.paths.maps)
            elif carried is not None:
                try:
                    os.unlink(carried)
                except OSError:
                    pass
            if isinstance(e, DatapathError) and len(self._links) == len(HOOKS) and uses_these_maps:
                return self._keep_older_program(maps, meta, e)
            raise
        try:
            if self._maps is not None:
                self._maps.close()
            self._maps = maps = pkmaps.open_maps(self.paths.maps)
            if maps is None:
                raise DatapathError(f"loader did not leave pinned maps in {self.paths.maps}")
            pkmaps.write_config(maps, self.settings.listen_port)
            shared = had_links and attached_ids.get("pk_commit") == maps.ids["pk_commit"]
            if not had_links:
                self._write(maps, initial)
            elif not shared:
                # New maps are filled BEFORE the links move: with the attached
                # program's set when its maps can be read, else `initial`.
                carry = old_set if old_set is not None else list(initial)
                if old_set is None and not carry and attached_ids:
                    log.warning("program changed, the attached program's maps are unreadable "
                                "and no initial set was given: the swap waits for the first "
                                "apply()")
                    self._pending = new_progs
                    self._pending_meta = (self._loaded_hash(), self.last_load["loader"])
                    new_progs = {}
                    return True
                self._write(maps, carry)
            links_mod.swap_programs(self.paths, self._links, new_progs, self._root())
            self._write_meta(self._loaded_hash(), self.last_load["loader"])
            links_mod.drop_other_layouts(self.paths)
        finally:
            for fd in new_progs.values():
                close_quietly(fd)
        log.info("%s eBPF data path in %s (loader %s: %s; programs %s)",
                 "upgraded" if had_links else "installed", self.paths.base,
                 self.last_load.get("loader"), self.last_load.get("why"), self.last_load.get("progs"))
        return had_links

    def _keep_older_program(self, maps: Maps, meta: tuple[bytes, int, int] | None, e: Exception) -> bool:
        """The upgrade cannot load, but the attached older program uses this
        layout's maps: keep it and go on writing sets. An upgrade that cannot
        load must not freeze the set the kernel steers to."""
        pkmaps.write_config(maps, self.settings.listen_port)
        self.upgrade_error = str(e)
        codes = {v: k for k, v in LOADER_CODES.items()}
        self.last_load = {"loader": codes.get(meta[2], "unknown") if meta else "unknown",
                          "why": "kept the attached older program: the upgrade failed"}
        log.error("eBPF upgrade failed; the attached older program keeps steering and the set "
                  "is still written: %s", e)
        return True

    @_kernel_errors
    def apply(self, backends: Sequence[Backend]) -> bool:
        plan.split_families(backends)  # refused before anything is touched
        maps = self._ensure_maps()
        if maps is None:
            raise DatapathError(f"eBPF data path not installed (no maps in {self.paths.maps})")
        self._check_links()
        changed = self._write(maps, backends)
        if self._pending is not None and backends:
            progs, self._pending = self._pending, None
            try:
                if not self._links:
                    self._links = links_mod.open_links(self.paths)
                links_mod.swap_programs(self.paths, self._links, progs, self._root())
                self._write_meta(*self._pending_meta)
                links_mod.drop_other_layouts(self.paths)
            finally:
                for fd in progs.values():
                    close_quietly(fd)
        return changed

    @_kernel_errors
    def read_state(self) -> KernelState:
        details: dict[str, Any] = {"pin_dir": self.paths.base, "layout": self.layout}
        try:
            details["attach_cgroup"] = self._root()
        except DatapathError as e:
            details["attach_cgroup_error"] = str(e)
        links = self._links or links_mod.open_links(self.paths)
        own_links = links is not self._links
        try:
            prog_ids: dict[str, int] = {}
            link_ids: dict[str, int] = {}
            cgroup_ids: set[int] = set()
            for hook, lfd in links.items():
                li = bpf.link_info(lfd)
                if li.cgroup_id == 0:  # detached behind our back
                    details.setdefault("defunct_links", []).append(hook)
                    continue
                link_ids[hook] = li.id
                prog_ids[hook] = li.prog_id
                cgroup_ids.add(li.cgroup_id)
            details["link_ids"] = link_ids
            details["prog_ids"] = prog_ids
            details["cgroup_ids"] = sorted(cgroup_ids)
        finally:
            if own_links:
                for fd in links.values():
                    os.close(fd)
        meta = pkmaps.read_meta(self.paths.meta)
        details["program_hash"] = meta[0].hex() if meta else None
        details["program_current"] = bool(meta and meta[0] in self._current_hashes())
        if self.upgrade_error:
            details["upgrade_failed"] = self.upgrade_error
        codes = {v: k for k, v in LOADER_CODES.items()}
        details["loader"] = codes.get(meta[2], "unknown (an older release)") if meta else None
        if self.last_load:
            details["last_load"] = {k: v for k, v in self.last_load.items() if k != "ok"}
        maps = self._ensure_maps()
        if maps is None:
            return KernelState(self.name, installed=False, details=details)
        live = pkmaps.live(maps)
        details["generation"] = live.seq
        details["buffer"] = live.buf
        details["kernel_hz"] = kernel_hz()
        details["syn_rto_jiffies"] = {str(b): j for b, j in live.syn_rto}
        cfg = pkmaps.read_config(maps)
        if cfg:
            details["host_netns_cookie"], details["listen_port"] = cfg
        details["map_ids"] = dict(maps.ids)
        details["stats"] = pkmaps.read_stats(maps, self._ncpus)
        passive = pkmaps.read_passive(maps, self._ncpus)
        counters: dict[Backend, BackendCounters] = {}
        for b, n in pkmaps.read_counters(maps, self._ncpus).items():
            pc = passive.get(b, PassiveCounts())
            counters[b] = BackendCounters(connections=n, extra={
                "refused": pc.refused, "syn_timeouts": pc.syn_timeouts, "established": pc.established})
        details["suspect_window_s"] = SUSPECT_WINDOW_S
        details["suspect"] = {str(b): round(left, 3) for b, left in
                              sorted(pkmaps.read_suspect(maps).items())}
        installed = len(link_ids) == len(HOOKS)
        return KernelState(self.name, installed=installed, backends=live.v4 + live.v6,
                           counters=counters, details=details)

    # --- fast failover --------------------------------------------------------

    def _read_pinned(self, name: str, read: Callable[[Maps], dict]) -> dict:
        """read(maps) when installed ({} when not), a failed read as DatapathError."""
        maps = self._ensure_maps()
        if maps is None:
            return {}
        try:
            return read(maps)
        except OSError as e:
            raise DatapathError(f"reading {name} failed: {e}") from e

    def suspect_backends(self) -> dict[Backend, float]:
        """Backends the kernel currently avoids (pk_suspect, read only):
        backend -> seconds until the mark expires. {} when not installed."""
        return self._read_pinned("pk_suspect", pkmaps.read_suspect)

    def passive_failures(self) -> dict[Backend, PassiveCounts]:
        """Cumulative outcomes of steered connects per backend (the sockops
        program's pk_passive): one BPF_MAP_LOOKUP_BATCH syscall. {} when not
        installed."""
        return self._read_pinned("pk_passive", lambda m: pkmaps.read_passive(m, self._ncpus))

    @_kernel_errors
    def steered_sockets(self, backends: Sequence[Backend] | None = None) -> list[Any]:
        """The live steered sockets as netlink.SockId, to `backends` only when
        given (failover.py)."""
        maps = self._ensure_maps()
        return [] if maps is None else failover.steered_sockets(maps, backends)

    @_kernel_errors
    def close_connections(self, backends: Sequence[Backend]) -> int:
        """SOCK_DESTROY every live socket steered to `backends` (SYN_SENT and
        established alike), by exact 4-tuple and socket cookie: never a direct
        connection to the same address. Returns how many were aborted. Call
        after apply() took the backends out of the set."""
        if not backends:
            return 0
        return failover.destroy(self.steered_sockets(backends))

    def close(self) -> None:
        if self._maps is not None:
            self._maps.close()
            self._maps = None
        for fd in self._links.values():
            close_quietly(fd)
        self._links = {}
        if self._pending:
            for fd in self._pending.values():
                close_quietly(fd)
            self._pending = None

    @classmethod
    def cleanup(cls, settings: DatapathSettings) -> list[str]:
        """BPF_LINK_DETACH on every pinned link (connect hooks first), then
        unpin everything under /sys/fs/bpf/<instance>. Works without a daemon,
        idempotent; a running daemon's link fds become defunct links."""
        validate_instance(settings.instance)
        paths = Paths(settings.instance)
        if not links_mod.bpffs_mounted() or not os.path.isdir(paths.base):
            return []
        return links_mod.detach_all(paths) + remove_pins(paths.base)


__all__ = [
    "BPFFS",
    "HOOKS",
    "LAYOUT",
    "MAX_BACKENDS",
    "MAX_PASSIVE",
    "SUSPECT_WINDOW_S",
    "EbpfDatapath",
    "bcc_missing",
    "decode_backend",
    "default_object",
    "default_source",
    "encode_backend",
    "ensure_bpffs",
    "host_netns_cookie",
    "libbpf_missing",
    "loader_plan",
]
