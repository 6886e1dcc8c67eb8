"""The eBPF data path: cgroup sock_addr programs at the cgroup v2 root rewrite
connect() to 127.0.0.1:PORT / [::1]:PORT / [::ffff:127.0.0.1]:PORT into a
connect() to a healthy API server, in the host network namespace only; the
getpeername hooks make a steered socket report the address it connected to;
a sock_ops program follows the steered sockets through their handshake
(fast failover, below).
The programs are in bpf/prism_sock.bpf.c (its header comment describes them).

Process split
-------------
Loading never runs in the long-lived daemon: `install()` starts
`python -m prism_kernel.datapath.ebpf.loader`, which loads the programs with
their maps pinned and pins the programs in a staging dir, then exits. Its
loader is libbpf with the precompiled object (bpf/build.sh, at install time:
no compiler, headers or bcc on the node), or bcc compiling the same source at
run time (the fallback; `ebpf.loader`, see `loader_plan`). This module then
talks to the kernel only through bpf(2) via ctypes (_bpfsys): it opens pinned
objects by path, writes the maps, and creates / updates the cgroup links
itself.

Pinned state (bpffs, mounted at /sys/fs/bpf when missing)
---------------------------------------------------------
    /sys/fs/bpf/<instance>/
        meta                  ARRAY[1] {sha256 of program, map layout, loader}: what is attached
        maps-v<LAYOUT>/       pk_config pk_active pk_slots pk_counters pk_stats pk_peers
                              pk_passive pk_suspect pk_suspect_until
        links/                getpeername4 getpeername6 sockops connect4 connect6 (bpf_link)
        stage-<pid>/          programs between load and attach (transient)

Map layout and update order
---------------------------
pk_config (ARRAY[1]) {host netns cookie, listen port}; pk_active (HASH[1],
key 0) {generation, count4, count6, buf}; pk_slots (HASH) key
(family << 24 | buf << 16 | index) -> backend; pk_counters (PERCPU_HASH)
backend -> connects steered; pk_stats (PERCPU_ARRAY); pk_peers (SK_STORAGE);
pk_passive (PERCPU_HASH, 1024) backend -> {refused, syn_timeouts,
established}; pk_suspect (LRU_HASH, 1024) backend -> u64 deadline in
bpf_ktime_get_ns() (CLOCK_MONOTONIC); pk_suspect_until (ARRAY[1]) the latest
of those deadlines. The listen port lives in pk_config, not in the program:
a port change is a config write, not a new program.

Layout history: 1 = the four sock_addr programs; 2 = + sockops, pk_socks,
pk_passive, pk_peers gains the backend key, pk_stats gains three counters;
3 = + pk_suspect (in-kernel exclusion of suspect backends), pk_stats gains
four counters; 4 = pk_socks dropped (steered sockets are found by a
sock_diag dump of pk_peers instead, and sockops follows a socket only until
it is established), + pk_suspect_until, pk_stats loses the two pk_socks
counters.

One writer (the daemon). `_write_set()` follows the order documented in
bpf/prism_sock.bpf.c, the order Cilium's and Calico's service syncers use:
  0. zeroed counter entries for new backends;
  1. backend slots of the new set into the inactive buffer (!buf);
  2. pk_active <- {gen+1, count4, count6, !buf}: the single commit point (a
     hash element swapped under RCU: a connect sees all of the old set or
     all of the new one, both families at once);
  3. stale slots deleted (old buffer, beyond the counts);
  4. counters of removed backends deleted.
A reader that loaded the old selector and finds its slot gone in 3. re-reads
the selector (bounded, in the program). pk_passive is not touched by updates
(its counters are cumulative); only when it is 3/4 full are the entries of
backends outside the set dropped.

Fast failover (issue 4)
-----------------------
* Which sockets are ours: connect4/connect6 mark every socket they steer
  (pk_peers, per-socket storage, with the backend key). The sockops program
  (BPF_CGROUP_SOCK_OPS at the same cgroup root) acts only on marked sockets
  still connected to that backend, and only until the handshake is over: at
  TCP_CONNECT_CB (SYN about to leave) it enables the STATE and RTO callbacks
  for the socket, at ACTIVE_ESTABLISHED_CB it disables them again.
* close_connections(backends): a sock_diag dump of the TCP sockets with the
  backends' remote port (the kernel filters by port) that asks for each
  socket's pk_peers value (INET_DIAG_REQ_SK_BPF_STORAGES; both families for
  an IPv4 backend: dual-stack sockets reach it v4-mapped). A socket whose
  value names one of the backends and whose peer still is that backend is
  steered to it; a direct connection to the same address has no value. Then
  one SOCK_DESTROY per such socket by exact 4-tuple + cookie (a later socket
  reusing the tuple does not match), sent as one netlink batch (_netlink.py).
  Nothing is kept per socket for this, so it costs nothing per connection.
  Call it after apply() removed the backends: a connect that picked a
  backend microseconds before the removal and is not hashed yet (no local
  port) is not in the dump.
* passive_failures(): one BPF_MAP_LOOKUP_BATCH of pk_passive, summed over
  CPUs. refused = SYN_SENT -> CLOSE after a segment came in (the RST);
  syn_timeouts = every RTO in SYN_SENT (the first about 1 s after the SYN of
  a black-holed connect, then one a second while net.ipv4.
  tcp_syn_linear_timeouts lasts (Linux >= 6.7, default 4), then doubling);
  established = ACTIVE_ESTABLISHED_CB. A
  connect closed by its owner, aborted (SOCK_DESTROY) or failed by ICMP while
  in SYN_SENT is not "refused". Counters are cumulative while the maps live
  (adopt keeps them; a layout upgrade starts new maps at zero).
* Sockets steered before a layout upgrade from layout 1 are in the old
  pk_peers only: the new programs neither count nor close them (they finish
  on their own). From layout 2 on pk_peers is carried over (below).

In-kernel exclusion of suspect backends
---------------------------------------
The daemon polls pk_passive every 100 ms; a client whose connect() was
refused retries within microseconds and would draw the same dead backend
with probability 1/N. So the kernel reacts by itself:
* sockops: a steered connect REFUSED (SYN_SENT -> CLOSE after the RST) or an
  RTO in SYN_SENT sets pk_suspect[backend] = now + 2 s (SUSPECT_WINDOW_S;
  every further failure moves it on). The refusal is marked in tcp_done(),
  before the connecting process is woken with ECONNREFUSED, so its immediate
  retry already sees the mark (tests/test_datapath_suspect.py measures it).
* connect4/connect6: the random slot as before; when its backend is suspect,
  the other slots of the same buffer from there in a random direction (at
  most count - 1 steps), the first one not suspect wins (stat
  skipped_suspect); all suspect: the original pick (stat all_suspect). Never a
  failed or untouched connect because of the marks; a slot vanishing during
  the walk re-reads the selector like any pick.
* Nothing in user space writes pk_suspect: a mark expires by its deadline (a
  confirmed-dead backend leaves the set through the daemon, an unconfirmed
  one, say a single lost SYN, is drawn again after the window); LRU bounds
  the map. Direct connections are not steered sockets: they never mark.
  read_state().details["suspect"] = {"addr:port": seconds left} (live marks
  only); suspect_backends() returns the same as Backend -> seconds.

Adopt, upgrade, cleanup
-----------------------
* adopt: the five links are pinned, `meta` holds a hash this code would load
  (sha256 of what a loader takes, the object for libbpf or the source for
  bcc, + layout + limits + suspect window; under `auto` either loader's
  counts, so a bcc fallback is not reloaded at every start) and the pinned maps
  are the ones the attached program uses: open them and go on, nothing
  detached or rewritten but the config when the port changed. `install()`
  returns True.
* upgrade (links pinned, hash differs, or a link is missing): load the new
  program in the child. Same layout: it reuses the pinned maps, so the live
  set is already there. New layout: new maps dir, populated with the set read
  from the maps the attached program uses (or `initial`) BEFORE the links
  move. Then BPF_LINK_UPDATE with BPF_F_REPLACE (old prog fd) on each pinned
  link: an atomic program swap, never detach-then-attach. `install()` returns
  True (the service went on). When neither the old maps nor `initial` give a
  set, the swap waits for the first apply().
  pk_peers is carried into the new maps dir when its format is unchanged
  (layouts 2 to 4: the same map, pinned at the new path before the loader
  runs), so sockets steered before the upgrade keep their reverse
  translation and are still found by close_connections(). From layout 1 it
  is not: those sockets answer getpeername() with the backend's address.
* fresh: maps populated with `initial`, then links created (getpeername hooks
  first, so every steered socket has its reverse translation, then sockops,
  so that every steered socket is followed) and pinned.
* drift: apply() checks that the five links are still attached (link info
  has a cgroup) and raises DatapathError when one was detached behind the
  daemon's back, so the daemon's reconcile reinstalls; install() unpins a
  defunct link and creates it anew, keeping the others and the maps.
* cleanup(): BPF_LINK_DETACH on every pinned link (connect hooks first), then
  unpin everything under /sys/fs/bpf/<instance>. Works without a daemon,
  idempotent; a running daemon's link fds become defunct links.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import ipaddress
import json
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import prism_kernel
from prism_kernel._data import data_file
from prism_kernel.core.model import Backend
from prism_kernel.datapath.base import (
    BackendCounters,
    Datapath,
    DatapathSettings,
    KernelState,
    PassiveCounts,
    import_netlink,
)
from prism_kernel.datapath.ebpf import bpfsys as bpf
from prism_kernel.datapath.ebpf.cgroup import check_exclusive_attachments, find_cgroup2_root
from prism_kernel.errors import DatapathError, DatapathUnavailable

log = logging.getLogger(__name__)



LAYOUT = 4            # bump when a map's key/value format changes (new maps-v<N> dir)
MAX_BACKENDS = 64     # per family; PK_MAX_BACKENDS in the C source
MAX_PASSIVE = 1024    # PK_MAX_PASSIVE: backends with outcome counters (and pk_suspect entries)
SUSPECT_WINDOW_S = 2.0  # a refused / SYN-timed-out backend is avoided this long (pk_params.suspect_ns)
SUSPECT_NS = int(SUSPECT_WINDOW_S * 1_000_000_000)
BPFFS = "/sys/fs/bpf"
SO_NETNS_COOKIE = 71
LOADER_TIMEOUT_S = 120.0
OBJECT_NAME = "prism_sock.bpf.o"   # built by bpf/build.sh
SOURCE_NAME = "prism_sock.bpf.c"
LOADER_NAMES = ("libbpf", "bcc")
LOADER_CODES = {"libbpf": 1, "bcc": 2}

# Attach order: reverse translation and socket tracking before steering.
# Detach in reverse.
HOOKS: tuple[tuple[str, int], ...] = (
    ("getpeername4", bpf.BPF_CGROUP_INET4_GETPEERNAME),
    ("getpeername6", bpf.BPF_CGROUP_INET6_GETPEERNAME),
    ("sockops", bpf.BPF_CGROUP_SOCK_OPS),
    ("connect4", bpf.BPF_CGROUP_INET4_CONNECT),
    ("connect6", bpf.BPF_CGROUP_INET6_CONNECT),
)
MAP_NAMES = ("pk_config", "pk_active", "pk_slots", "pk_counters", "pk_stats", "pk_peers",
             "pk_passive", "pk_suspect", "pk_suspect_until")
STAT_NAMES = ("steered", "no_backend", "retry", "peer_xlate",  # PK_STAT_* order
              "passive_full",
              "skipped_suspect", "all_suspect", "suspect_marked", "suspect_mark_failed")

_INSTANCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

# Encodings of the C structs (bpf/prism_sock.bpf.c), native byte order.
_CONFIG = struct.Struct("=QII")      # host_netns_cookie, listen_port, flags
_ACTIVE = struct.Struct("=QIIII")    # gen, count4, count6, buf, pad
_BACKEND_SIZE = 20                   # addr[16] (network order), port (network order), family, pad
_META = struct.Struct("=32sII24x")   # sha256, layout, loader (LOADER_CODES; 0 before it was kept)
_PEER = struct.Struct("=16s16s2s2s4x20s")  # pk_peer: orig addr, backend addr, ports, backend key
_OUTCOME = struct.Struct("=QQQ")     # pk_outcome: refused, syn_timeouts, established (per CPU)
_DEADLINE = struct.Struct("=Q")      # pk_suspect value: bpf_ktime_get_ns() (CLOCK_MONOTONIC)
_KEY0 = struct.pack("=I", 0)


def _slot_key(family: int, buf: int, index: int) -> bytes:
    return struct.pack("=I", (family << 24) | (buf << 16) | index)


def _split_slot_key(key: bytes) -> tuple[int, int, int]:
    k = struct.unpack("=I", key)[0]
    return k >> 24, (k >> 16) & 0xFF, k & 0xFFFF


def encode_backend(b: Backend) -> bytes:
    addr = b.address.packed.ljust(16, b"\0")
    return addr + struct.pack("!H", b.port) + bytes((b.family, 0))


def decode_backend(raw: bytes) -> Backend:
    family = raw[18]
    port = struct.unpack("!H", raw[16:18])[0]
    if family == 4:
        return Backend(4, ipaddress.IPv4Address(raw[:4]), port)
    if family == 6:
        return Backend(6, ipaddress.IPv6Address(raw[:16]), port)
    raise DatapathError(f"corrupt backend entry in kernel map (family {family})")


def _bpf_file(name: str) -> Path:
    """`name` in $PRISM_KERNEL_BPF_DIR, else shipped with the package (bpf/)."""
    env = os.environ.get("PRISM_KERNEL_BPF_DIR")
    if env:
        return Path(env) / name
    return data_file("bpf", name)


def default_source() -> Path:
    return _bpf_file(SOURCE_NAME)


def default_object() -> Path:
    return _bpf_file(OBJECT_NAME)


def libbpf_missing() -> str | None:
    """Why Debian's libbpf1 cannot be loaded here; None when it can."""
    import ctypes  # noqa: PLC0415

    try:
        ctypes.CDLL("libbpf.so.1")
    except OSError as e:
        return f"libbpf.so.1 cannot be loaded (Debian: libbpf1): {e}"
    return None


def bcc_missing() -> str | None:
    """Why the bcc loader cannot run here (bcc importable by the loader's
    Python, kernel headers for its compiler); None when it can."""
    python = _loader_python(bcc=True)
    if python == sys.executable:
        if importlib.util.find_spec("bcc") is None:
            return "bcc (Debian python3-bpfcc) is not importable"
    elif not os.path.exists(python):
        return f"bcc (Debian python3-bpfcc) is not importable here and there is no {python}"
    elif python == "/usr/bin/python3" and not os.path.exists(DEBIAN_BCC):
        return f"bcc (Debian python3-bpfcc) is not installed ({DEBIAN_BCC})"
    build = Path(f"/lib/modules/{os.uname().release}/build")
    if not (build / "include").is_dir():
        return (f"kernel headers missing: bcc needs {build} (and .../source); install "
                "linux-headers and link build/source there (see dev.sh)")
    return None


def loader_plan(requested: str, obj: Path | None = None) -> list[tuple[str, str]]:
    """The loaders to try, in order, each with why: `libbpf` and `bcc` are
    only themselves; `auto` is libbpf with the precompiled object, and bcc
    when there is no object (a source checkout that was never built) or when
    libbpf's load fails (a kernel whose verifier rejects the object, tried in
    this order by install()). Empty when none can run here; the reasons are
    then in the DatapathUnavailable that check_available raises."""
    obj = obj or default_object()
    libbpf_why = libbpf_missing() or (None if obj.exists() else
                                     f"no precompiled object at {obj} (bpf/build.sh builds it)")
    if requested == "libbpf":
        if libbpf_why:
            raise DatapathUnavailable("ebpf", f"ebpf.loader libbpf: {libbpf_why}")
        return [("libbpf", f"precompiled object {obj}")]
    bcc_why = bcc_missing()
    if requested == "bcc":
        if bcc_why:
            raise DatapathUnavailable("ebpf", f"ebpf.loader bcc: {bcc_why}")
        return [("bcc", "ebpf.loader bcc")]
    plan: list[tuple[str, str]] = []
    if libbpf_why is None:
        plan.append(("libbpf", f"precompiled object {obj}"))
    if bcc_why is None:
        plan.append(("bcc", "fallback if libbpf's load fails" if plan else f"fallback: {libbpf_why}"))
    if not plan:
        raise DatapathUnavailable("ebpf", f"no eBPF loader: libbpf: {libbpf_why}; bcc: {bcc_why}")
    return plan


DEBIAN_BCC = "/usr/lib/python3/dist-packages/bcc/__init__.py"  # what /usr/bin/python3 imports


def _loader_python(bcc: bool) -> str:
    """The libbpf loader runs with this interpreter; bcc's with one that can
    import bcc (Debian's, when this venv cannot)."""
    if not bcc:
        return sys.executable
    override = os.environ.get("PRISM_KERNEL_BCC_PYTHON")
    if override:
        return override
    if importlib.util.find_spec("bcc") is not None:
        return sys.executable
    return "/usr/bin/python3"


def host_netns_cookie() -> int:
    """The netns cookie of this process's network namespace (SO_NETNS_COOKIE,
    Linux 5.14), or 0 where the kernel cannot tell it: the programs then
    steer in the initial network namespace (bpf_get_netns_cookie(NULL))."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        except OSError as e:
            if e.errno != errno.ENOPROTOOPT:
                raise
            return 0
    return struct.unpack("=Q", raw)[0]


def _bpffs_mounted(path: str = BPFFS) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "bpf" and left.split(" ")[4] == path:
                    return True
    except OSError:
        pass
    return False


def ensure_bpffs(path: str = BPFFS) -> None:
    if _bpffs_mounted(path):
        return
    import ctypes  # noqa: PLC0415

    os.makedirs(path, exist_ok=True)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", os.fsencode(path), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise DatapathError(f"cannot mount bpffs at {path}: {os.strerror(err)}")
    log.info("mounted bpffs at %s", path)



@dataclass
class _Maps:
    """Open fds of one layout's maps."""

    fds: dict[str, int]
    ids: dict[str, int]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class _Paths:
    def __init__(self, instance: str, layout: int = LAYOUT):
        self.base = os.path.join(BPFFS, instance)
        self.meta = os.path.join(self.base, "meta")
        self.links = os.path.join(self.base, "links")
        self.maps = os.path.join(self.base, f"maps-v{layout}")

    def link(self, hook: str) -> str:
        return os.path.join(self.links, hook)

    def map(self, name: str) -> str:
        return os.path.join(self.maps, name)

    def stage(self) -> str:
        return os.path.join(self.base, f"stage-{os.getpid()}")


def _validate_instance(instance: str) -> None:
    if not _INSTANCE_RE.fullmatch(instance):
        raise DatapathError(f"instance name {instance!r} is not usable as a bpffs directory "
                            "name (letters, digits, '_', '.', '-'; at most 64)")


def _close_quietly(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _remove_pins(path: str) -> list[str]:
    """Unpin everything under a bpffs directory (bottom-up). Returns what was removed."""
    removed: list[str] = []
    if not os.path.isdir(path):
        return removed
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            p = os.path.join(root, name)
            try:
                os.unlink(p)
                removed.append(f"pin {p}")
            except FileNotFoundError:
                pass
        for name in dirs:
            try:
                os.rmdir(os.path.join(root, name))
            except FileNotFoundError:
                pass
    try:
        os.rmdir(path)
        removed.append(f"bpffs dir {path}")
    except FileNotFoundError:
        pass
    return removed


class EbpfDatapath(Datapath):
    name: ClassVar[str] = "ebpf"

    def __init__(self, settings: DatapathSettings, *, source: str | Path | None = None,
                 obj: str | Path | None = None, layout: int = LAYOUT):
        """`source`, `obj` and `layout` exist for tests of the upgrade path (a
        changed program, a changed map layout); the daemon uses the defaults."""
        super().__init__(settings)
        _validate_instance(settings.instance)
        self.source = Path(source) if source is not None else default_source()
        self.obj = Path(obj) if obj is not None else default_object()
        self.layout = layout
        self.paths = _Paths(settings.instance, layout)
        self._maps: _Maps | None = None
        self._links: dict[str, int] = {}
        self._cgroup_root: str | None = None
        self._pending: dict[str, int] | None = None  # staged prog fds of a deferred upgrade
        self._pending_meta: tuple[bytes, str] = (b"", "")
        self.upgrade_error: str | None = None  # install() kept an older program (same layout)
        self._hashes: dict[bytes, str] | None = None
        self._ncpus = bpf.possible_cpus()
        self._outcomes = struct.Struct(f"={3 * self._ncpus}Q")  # pk_passive value, all CPUs
        self.last_load: dict[str, Any] = {}

    # --- availability ----------------------------------------------------

    @classmethod
    def check_available(cls, settings: DatapathSettings) -> None:
        """Capabilities, the cgroup root, the kernel's features (probed) and a
        loader that can run here. In-process and cheap (no program of ours is
        loaded: install() would be the second load at every start); a verifier
        that rejects the object shows at install(), or in check_load()."""
        def unavailable(reason: str) -> DatapathUnavailable:
            return DatapathUnavailable(cls.name, reason)

        if sys.platform != "linux":
            raise unavailable("needs Linux")
        try:
            bpf._nr()
        except OSError as e:
            raise unavailable(str(e)) from None
        try:
            _validate_instance(settings.instance)
        except DatapathError as e:
            raise unavailable(str(e)) from None
        cap = bpf.cap_eff()
        cap_sys_admin, cap_net_admin, cap_bpf = 1 << 21, 1 << 12, 1 << 39
        if not (cap & cap_sys_admin or (cap & cap_bpf and cap & cap_net_admin)):
            raise unavailable("missing capability: needs CAP_SYS_ADMIN, or CAP_BPF and "
                              "CAP_NET_ADMIN, to load and attach cgroup BPF programs")
        try:
            root = find_cgroup2_root()
        except DatapathError as e:
            raise unavailable(str(e)) from None
        if not os.path.isdir(BPFFS) and not os.path.isdir(os.path.dirname(BPFFS)):
            raise unavailable(f"no {BPFFS} to mount bpffs on")
        # What the kernel can do, probed (never a version number: distributions
        # backport); each probe loads a tiny program or sends a request that
        # changes nothing.
        from prism_kernel.datapath.ebpf import features as bpf_features  # noqa: PLC0415

        missing = bpf_features.missing()
        if missing:
            raise unavailable("; ".join(missing))
        check_exclusive_attachments(root, cls.name)  # another program's non-multi attach at the root
        loader_plan(settings.ebpf_loader)  # raises when no loader can run here

    @classmethod
    def check_load(cls, settings: DatapathSettings) -> dict:
        """Load the programs as install() would, with private maps, in the
        loader child, and let them go (nothing pinned, nothing attached):
        whether this kernel's verifier accepts them. `doctor` runs it."""
        failures = []
        for loader, why in loader_plan(settings.ebpf_loader):
            req = {"loader": loader, "mode": "check", "layout": LAYOUT, "suspect_ns": SUSPECT_NS,
                   "object": str(default_object()), "source": str(default_source())}
            res = _run_loader(req, raise_on_error=False)
            if res.get("ok"):
                res["why"] = why
                res["failed_before"] = failures
                return res
            failures.append(f"{loader} ({res.get('stage')}): {res.get('error')}")
        raise DatapathUnavailable(cls.name, "no loader could load the programs: " + " | ".join(failures))

    # --- kernel objects -----------------------------------------------------

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
        """Hash -> loader, for each loader whose program would be current:
        an attached program of any of them is adopted, not reloaded. Read
        once (status and every metrics scrape ask)."""
        if self._hashes is None:
            loaders = LOADER_NAMES if self.settings.ebpf_loader == "auto" else (self.settings.ebpf_loader,)
            self._hashes = {self._program_hash(name): name for name in loaders}
        return self._hashes

    def _root(self) -> str:
        if self._cgroup_root is None:
            self._cgroup_root = find_cgroup2_root()
        return self._cgroup_root

    def _open_maps(self, paths: _Paths | None = None) -> _Maps | None:
        paths = paths or self.paths
        fds: dict[str, int] = {}
        ids: dict[str, int] = {}
        try:
            for name in MAP_NAMES:
                fd = bpf.obj_get(paths.map(name))
                fds[name] = fd
                ids[name] = bpf.map_info(fd).id
        except OSError as e:
            for fd in fds.values():
                os.close(fd)
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            raise DatapathError(f"cannot open pinned map in {paths.maps}: {e}") from e
        return _Maps(fds, ids)

    def _ensure_maps(self) -> _Maps | None:
        if self._maps is None:
            self._maps = self._open_maps()
        return self._maps

    def _open_links(self, drop_defunct: bool = False) -> dict[str, int]:
        """Pinned links by hook. A defunct link (detached behind our back:
        BPF_LINK_DETACH leaves the pin, with no cgroup) is left out, and
        unpinned when `drop_defunct`, so that install() creates it anew."""
        links: dict[str, int] = {}
        for hook, _ in HOOKS:
            path = self.paths.link(hook)
            try:
                fd = bpf.obj_get(path)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                    for fd in links.values():
                        os.close(fd)
                    raise DatapathError(f"cannot open pinned link {path}: {e}") from e
                continue
            if bpf.link_info(fd).cgroup_id == 0:
                os.close(fd)
                if drop_defunct:
                    log.warning("link %s was detached behind our back; unpinning it", path)
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
                continue
            links[hook] = fd
        return links

    def _check_links(self) -> None:
        """Raise DatapathError when a hook is no longer attached, so that the
        daemon's reconcile loop reinstalls."""
        if self._pending is not None:
            return
        if not self._links:
            self._links = self._open_links()
        missing = [hook for hook, _ in HOOKS if hook not in self._links]
        for hook, fd in self._links.items():
            try:
                if bpf.link_info(fd).cgroup_id == 0:
                    missing.append(hook)
            except OSError:
                missing.append(hook)
        if missing:
            raise DatapathError(f"eBPF hooks no longer attached: {', '.join(sorted(missing))} "
                                f"(detached behind the daemon's back); reinstall needed")

    def _read_meta(self) -> tuple[bytes, int, int] | None:
        try:
            fd = bpf.obj_get(self.paths.meta)
        except OSError:
            return None
        try:
            raw = bpf.map_lookup(fd, _KEY0, _META.size)
        finally:
            os.close(fd)
        if raw is None:
            return None
        return _META.unpack(raw)

    def _write_meta(self, digest: bytes, loader: str) -> None:
        try:
            fd = bpf.obj_get(self.paths.meta)
        except OSError:
            fd = bpf.map_create(bpf.BPF_MAP_TYPE_ARRAY, 4, _META.size, 1, name="pk_meta")
            try:
                bpf.obj_pin(fd, self.paths.meta)
            except OSError:
                os.close(fd)
                raise
        try:
            bpf.map_update(fd, _KEY0, _META.pack(digest, self.layout, LOADER_CODES.get(loader, 0)))
        finally:
            os.close(fd)

    def _write_config(self, maps: _Maps) -> bool:
        want = _CONFIG.pack(host_netns_cookie(), self.settings.listen_port, 0)
        if bpf.map_lookup(maps.fds["pk_config"], _KEY0, _CONFIG.size) == want:
            return False
        bpf.map_update(maps.fds["pk_config"], _KEY0, want)
        return True

    # --- the backend set ------------------------------------------------------

    @staticmethod
    def _read_set_from(active_fd: int, slots_fd: int) -> tuple[tuple[int, int, int, int], list[Backend], list[Backend]]:
        raw = bpf.map_lookup(active_fd, _KEY0, _ACTIVE.size)
        if raw is None:
            return (0, 0, 0, 0), [], []
        gen, c4, c6, buf, _ = _ACTIVE.unpack(raw)
        sets: dict[int, list[Backend]] = {4: [], 6: []}
        for fam, cnt in ((4, c4), (6, c6)):
            for i in range(min(cnt, MAX_BACKENDS)):
                v = bpf.map_lookup(slots_fd, _slot_key(fam, buf, i), _BACKEND_SIZE)
                if v is not None:
                    sets[fam].append(decode_backend(v))
        return (gen, c4, c6, buf), sets[4], sets[6]

    def _read_set(self, maps: _Maps):
        return self._read_set_from(maps.fds["pk_active"], maps.fds["pk_slots"])

    def _write_set(self, maps: _Maps, new4: list[Backend], new6: list[Backend]) -> int:
        """The update protocol (see the module docstring). Returns the new generation."""
        active_fd, slots_fd, counters_fd = (maps.fds["pk_active"], maps.fds["pk_slots"],
                                            maps.fds["pk_counters"])
        raw = bpf.map_lookup(active_fd, _KEY0, _ACTIVE.size)
        gen, _, _, buf, _ = _ACTIVE.unpack(raw) if raw else (0, 0, 0, 1, 0)
        nb = (buf ^ 1) & 1
        wanted = {encode_backend(b) for b in (*new4, *new6)}
        zeros = bytes(8 * self._ncpus)
        try:
            # 0. counters exist before any connect can pick the backend
            for key in wanted:
                try:
                    bpf.map_update(counters_fd, key, zeros, bpf.BPF_NOEXIST)
                except OSError as e:
                    if e.errno != errno.EEXIST:
                        raise
            # 1. slots of the new set, in the inactive buffer
            for fam, lst in ((4, new4), (6, new6)):
                for i, b in enumerate(lst):
                    bpf.map_update(slots_fd, _slot_key(fam, nb, i), encode_backend(b))
            # 2. commit: one hash element, swapped under RCU
            bpf.map_update(active_fd, _KEY0, _ACTIVE.pack(gen + 1, len(new4), len(new6), nb, 0))
        except OSError as e:
            raise DatapathError(f"writing the backend set failed before the commit "
                                f"(the kernel still steers to the previous set): {e}") from e
        # 3. stale slots: the old buffer and anything beyond the new counts
        counts = {4: len(new4), 6: len(new6)}
        for key in bpf.map_keys(slots_fd, 4):
            fam, b, idx = _split_slot_key(key)
            if b != nb or idx >= counts.get(fam, 0):
                bpf.map_delete(slots_fd, key)
        # 4. counters of backends that left
        for key in bpf.map_keys(counters_fd, _BACKEND_SIZE):
            if key not in wanted:
                bpf.map_delete(counters_fd, key)
        # 5. outcome counters stay (cumulative), unless the map is filling up
        passive_fd = maps.fds["pk_passive"]
        keys = bpf.map_keys(passive_fd, _BACKEND_SIZE, MAX_PASSIVE + 1)
        if len(keys) > MAX_PASSIVE * 3 // 4:
            dropped = [k for k in keys if k not in wanted]
            for key in dropped:
                bpf.map_delete(passive_fd, key)
            log.info("pk_passive %d/%d full: dropped the outcome counters of %d backends "
                     "outside the set", len(keys), MAX_PASSIVE, len(dropped))
        return gen + 1

    @staticmethod
    def _split(backends: Sequence[Backend]) -> tuple[list[Backend], list[Backend]]:
        uniq = sorted(set(backends))
        new4 = [b for b in uniq if b.family == 4]
        new6 = [b for b in uniq if b.family == 6]
        for fam, lst in ((4, new4), (6, new6)):
            if len(lst) > MAX_BACKENDS:
                raise DatapathError(f"{len(lst)} IPv{fam} backends: the eBPF data path holds "
                                    f"at most {MAX_BACKENDS} per family")
        for b in uniq:
            if b.family not in (4, 6) or b.address.version != b.family:
                raise DatapathError(f"backend {b}: family {b.family} does not match its address")
            if not 0 < b.port < 65536:
                raise DatapathError(f"backend {b}: port out of range")
        return new4, new6

    # --- loading and attaching ------------------------------------------------

    def _load(self) -> dict[str, int]:
        """Load in the child, with the loaders of loader_plan() in order;
        returns fds of the staged programs (pins removed again: the fds keep
        the programs alive). self.last_load says which loader and why."""
        stage = self.paths.stage()
        failures: list[str] = []
        for loader, why in loader_plan(self.settings.ebpf_loader, self.obj):
            _remove_pins(stage)
            req = {"loader": loader, "mode": "load", "layout": self.layout,
                   "suspect_ns": SUSPECT_NS, "map_dir": self.paths.maps, "stage_dir": stage}
            req["object" if loader == "libbpf" else "source"] = str(
                self.obj if loader == "libbpf" else self.source)
            try:
                res = _run_loader(req, raise_on_error=False)
                if not res.get("ok"):
                    failures.append(f"{loader} ({res.get('stage')}): {res.get('error')}")
                    log.warning("eBPF loader %s failed at %s: %s", loader, res.get("stage"),
                                _last_lines(str(res.get("error")), 3))
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
                _remove_pins(stage)
        raise DatapathError("eBPF loader failed: " + " | ".join(failures))

    def _attached_prog_maps(self, links: dict[str, int]) -> dict[str, int]:
        """name -> map id of the maps the attached connect program uses."""
        for hook in ("connect4", "connect6"):
            if hook not in links:
                continue
            try:
                pid = bpf.link_info(links[hook]).prog_id
                pfd = bpf.prog_fd_by_id(pid)
            except OSError:
                continue
            try:
                out: dict[str, int] = {}
                for mid in bpf.prog_info(pfd).map_ids:
                    try:
                        mfd = bpf.map_fd_by_id(mid)
                    except OSError:
                        continue
                    try:
                        out[bpf.map_info(mfd).name] = mid
                    finally:
                        os.close(mfd)
                return out
            finally:
                os.close(pfd)
        return {}

    def _read_attached_set(self, links: dict[str, int]) -> list[Backend] | None:
        """The set the attached program steers to, read through its own maps
        (found by id, so unpinned or older-layout maps work too) when their
        format is the one this code knows; None otherwise."""
        ids = self._attached_prog_maps(links)
        if "pk_active" not in ids or "pk_slots" not in ids:
            return None
        afd = sfd = None
        try:
            afd = bpf.map_fd_by_id(ids["pk_active"])
            sfd = bpf.map_fd_by_id(ids["pk_slots"])
            ai, si = bpf.map_info(afd), bpf.map_info(sfd)
            if (ai.key_size, ai.value_size, si.key_size, si.value_size) != (4, _ACTIVE.size, 4, _BACKEND_SIZE):
                return None
            _, s4, s6 = self._read_set_from(afd, sfd)
            return s4 + s6
        except (OSError, DatapathError):
            return None
        finally:
            _close_quietly(afd)
            _close_quietly(sfd)

    def _carry_peers(self, attached_ids: dict[str, int]) -> str | None:
        """Before a layout upgrade loads the new program: when the attached
        program's pk_peers has the format this code uses (layouts 2 to 4),
        pin that very map into the new maps dir, so the loader reuses it.
        The sockets steered before the upgrade then keep their reverse
        translation, and close_connections() still finds them: a watch
        connection that predates the upgrade is not left hanging on a dead
        backend later. Layout 1's pk_peers (no backend key) is not carried.
        Returns the path pinned (to be unpinned if the load fails), else None."""
        mid = attached_ids.get("pk_peers")
        target = self.paths.map("pk_peers")
        if mid is None or os.path.exists(target):
            return None
        try:
            fd = bpf.map_fd_by_id(mid)
        except OSError:
            return None
        try:
            mi = bpf.map_info(fd)
            if (mi.type, mi.key_size, mi.value_size) != (bpf.BPF_MAP_TYPE_SK_STORAGE, 4, _PEER.size):
                log.info("layout upgrade: the attached pk_peers (value %d bytes) is not carried "
                         "over; sockets steered before the upgrade answer getpeername() with "
                         "the backend's address", mi.value_size)
                return None
            os.makedirs(self.paths.maps, mode=0o700, exist_ok=True)
            bpf.obj_pin(fd, target)
            log.info("layout upgrade: pk_peers (map %d) carried over with its sockets", mid)
            return target
        except OSError as e:
            log.warning("layout upgrade: could not carry pk_peers over: %s", e)
            return None
        finally:
            os.close(fd)

    def _swap_programs(self, new: dict[str, int]) -> None:
        """Move every hook to the new program: BPF_LINK_UPDATE (BPF_F_REPLACE)
        on existing links, link create + pin for missing ones."""
        os.makedirs(self.paths.links, mode=0o700, exist_ok=True)
        root_fd = os.open(self._root(), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        created: list[tuple[str, int]] = []
        try:
            for hook, attach_type in HOOKS:
                if hook in self._links:
                    lfd = self._links[hook]
                    old = bpf.link_info(lfd).prog_id
                    old_fd = bpf.prog_fd_by_id(old)
                    try:
                        bpf.link_update(lfd, new[hook], old_fd)
                    finally:
                        os.close(old_fd)
                    log.info("%s: link updated, prog %d -> %d", hook, old,
                             bpf.prog_info(new[hook]).id)
                else:
                    lfd = bpf.link_create(new[hook], root_fd, attach_type)
                    created.append((hook, lfd))
                    bpf.obj_pin(lfd, self.paths.link(hook))
                    self._links[hook] = lfd
        except OSError as e:
            # A fresh attach half done: undo what this call created.
            for hook, lfd in created:
                try:
                    bpf.link_detach(lfd)
                except OSError:
                    pass
                try:
                    os.unlink(self.paths.link(hook))
                except OSError:
                    pass
                self._links.pop(hook, None)
                _close_quietly(lfd)
            raise DatapathError(f"attaching at cgroup {self._root()} failed: {e}") from e
        finally:
            os.close(root_fd)

    def _drop_other_layouts(self) -> None:
        base = self.paths.base
        for name in os.listdir(base):
            if name.startswith("maps-v") and os.path.join(base, name) != self.paths.maps:
                _remove_pins(os.path.join(base, name))
                log.info("unpinned maps of old layout %s", name)

    # --- the interface --------------------------------------------------------

    def install(self, initial: Sequence[Backend]) -> bool:
        new4, new6 = self._split(initial)
        self._root()
        ensure_bpffs()
        os.makedirs(self.paths.base, mode=0o700, exist_ok=True)
        for name in os.listdir(self.paths.base):  # stage dirs of a killed install
            if name.startswith("stage-"):
                _remove_pins(os.path.join(self.paths.base, name))
        current = self._current_hashes()
        bpf.raise_memlock()  # kernels before 5.11 charge BPF maps to it

        self.close()
        self._links = self._open_links(drop_defunct=True)
        meta = self._read_meta()
        maps = self._ensure_maps()
        attached_ids = self._attached_prog_maps(self._links)
        if (len(self._links) == len(HOOKS) and meta is not None and meta[0] in current
                and meta[1] == self.layout and maps is not None
                and attached_ids.get("pk_active") == maps.ids["pk_active"]):
            if self._write_config(maps):
                log.info("adopted; config updated (listen port %d)", self.settings.listen_port)
            self.last_load = {"loader": current[meta[0]], "why": "adopted: the attached program "
                              "is current, nothing loaded"}
            log.info("adopted the attached eBPF data path in %s (loaded by %s)", self.paths.base,
                     current[meta[0]])
            return True

        had_links = bool(self._links)
        old_set = self._read_attached_set(self._links) if had_links else None
        new_dir = not os.path.isdir(self.paths.maps)
        carried = self._carry_peers(attached_ids) if had_links else None
        try:
            new_progs = self._load()
        except BaseException as e:
            # A failed install or upgrade leaves no new pin behind: the maps
            # dir this attempt created (the loader may have pinned maps before
            # a program failed to load), else the pk_peers pin it added.
            if new_dir:
                _remove_pins(self.paths.maps)
            elif carried is not None:
                try:
                    os.unlink(carried)
                except OSError:
                    pass
            if (isinstance(e, DatapathError) and len(self._links) == len(HOOKS) and maps is not None
                    and attached_ids.get("pk_active") == maps.ids["pk_active"]):
                # The attached program is older but uses this layout's maps:
                # keep it and go on writing sets. An upgrade that cannot load
                # must not freeze the set the kernel steers to.
                self._write_config(maps)
                self.upgrade_error = str(e)
                codes = {v: k for k, v in LOADER_CODES.items()}
                self.last_load = {"loader": codes.get(meta[2], "unknown") if meta else "unknown",
                                  "why": "kept the attached older program: the upgrade failed"}
                log.error("eBPF upgrade failed; the attached older program keeps steering and the set "
                          "is still written: %s", e)
                return True
            raise
        try:
            if self._maps is not None:
                self._maps.close()
            self._maps = maps = self._open_maps()
            if maps is None:
                raise DatapathError(f"loader did not leave pinned maps in {self.paths.maps}")
            self._write_config(maps)
            shared = had_links and attached_ids.get("pk_active") == maps.ids["pk_active"]
            if not had_links:
                self._write_set(maps, new4, new6)
            elif not shared:
                # The attached program's set when its maps can be read, else `initial`.
                carry = old_set if old_set is not None else list(initial)
                if old_set is None and not carry and attached_ids:
                    log.warning("program changed, the attached program's maps are unreadable "
                                "and no initial set was given: the swap waits for the first "
                                "apply()")
                    self._pending = new_progs
                    self._pending_meta = (self._loaded_hash(), self.last_load["loader"])
                    new_progs = {}
                    return True
                c4, c6 = self._split(carry)
                self._write_set(maps, c4, c6)
            self._swap_programs(new_progs)
            self._write_meta(self._loaded_hash(), self.last_load["loader"])
            self._drop_other_layouts()
        finally:
            for fd in new_progs.values():
                _close_quietly(fd)
        log.info("%s eBPF data path in %s (loader %s: %s; programs %s)",
                 "upgraded" if had_links else "installed", self.paths.base,
                 self.last_load.get("loader"), self.last_load.get("why"), self.last_load.get("progs"))
        return had_links

    def apply(self, backends: Sequence[Backend]) -> bool:
        new4, new6 = self._split(backends)
        maps = self._ensure_maps()
        if maps is None:
            raise DatapathError(f"eBPF data path not installed (no maps in {self.paths.maps})")
        self._check_links()
        _, cur4, cur6 = self._read_set(maps)
        changed = (sorted(cur4), sorted(cur6)) != (new4, new6)
        if changed:
            gen = self._write_set(maps, new4, new6)
            log.debug("backend set generation %d: %d IPv4, %d IPv6", gen, len(new4), len(new6))
        if self._pending is not None and (new4 or new6):
            progs, self._pending = self._pending, None
            try:
                if not self._links:
                    self._links = self._open_links()
                self._swap_programs(progs)
                self._write_meta(*self._pending_meta)
                self._drop_other_layouts()
            finally:
                for fd in progs.values():
                    _close_quietly(fd)
        return changed

    def read_state(self) -> KernelState:
        details: dict[str, Any] = {"pin_dir": self.paths.base, "layout": self.layout}
        try:
            details["attach_cgroup"] = self._root()
        except DatapathError as e:
            details["attach_cgroup_error"] = str(e)
        links = self._links or self._open_links()
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
        meta = self._read_meta()
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
        (gen, _, _, buf), s4, s6 = self._read_set(maps)
        details["generation"] = gen
        details["buffer"] = buf
        cfg = bpf.map_lookup(maps.fds["pk_config"], _KEY0, _CONFIG.size)
        if cfg:
            cookie, port, _ = _CONFIG.unpack(cfg)
            details["listen_port"] = port
            details["host_netns_cookie"] = cookie
        details["map_ids"] = dict(maps.ids)
        stats: dict[str, int] = {}
        for i, sname in enumerate(STAT_NAMES):
            raw = bpf.map_lookup(maps.fds["pk_stats"], struct.pack("=I", i), 8 * self._ncpus)
            stats[sname] = sum(struct.unpack(f"={self._ncpus}Q", raw)) if raw else 0
        details["stats"] = stats
        counters: dict[Backend, BackendCounters] = {}
        cfd = maps.fds["pk_counters"]
        passive = self._read_passive(maps)
        for key in bpf.map_keys(cfd, _BACKEND_SIZE):
            raw = bpf.map_lookup(cfd, key, 8 * self._ncpus)
            if raw is None:
                continue
            b = decode_backend(key)
            pc = passive.get(b, PassiveCounts())
            counters[b] = BackendCounters(
                connections=sum(struct.unpack(f"={self._ncpus}Q", raw)),
                extra={"refused": pc.refused, "syn_timeouts": pc.syn_timeouts,
                       "established": pc.established})
        details["suspect_window_s"] = SUSPECT_WINDOW_S
        details["suspect"] = {str(b): round(left, 3) for b, left in
                              sorted(self._read_suspect(maps).items())}
        installed = len(link_ids) == len(HOOKS)
        return KernelState(self.name, installed=installed, backends=tuple(s4 + s6),
                           counters=counters, details=details)

    # --- fast failover ----------------------------------------------------------

    def _read_passive(self, maps: _Maps) -> dict[Backend, PassiveCounts]:
        ncpus, st = self._ncpus, self._outcomes
        out: dict[Backend, PassiveCounts] = {}
        for key, raw in bpf.map_lookup_batch(maps.fds["pk_passive"], _BACKEND_SIZE,
                                             _OUTCOME.size * ncpus, chunk=64):
            v = st.unpack(raw)
            out[decode_backend(key)] = PassiveCounts(refused=sum(v[0::3]),
                                                     syn_timeouts=sum(v[1::3]),
                                                     established=sum(v[2::3]))
        return out

    def _read_suspect(self, maps: _Maps) -> dict[Backend, float]:
        now = time.monotonic_ns()  # the clock of bpf_ktime_get_ns()
        out: dict[Backend, float] = {}
        for key, raw in bpf.map_lookup_batch(maps.fds["pk_suspect"], _BACKEND_SIZE,
                                             _DEADLINE.size, chunk=256):
            until = _DEADLINE.unpack(raw)[0]
            if until > now:
                try:
                    out[decode_backend(key)] = (until - now) / 1e9
                except DatapathError:
                    continue
        return out

    def _read_pinned(self, name: str, read: Any) -> dict:
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
        return self._read_pinned("pk_suspect", self._read_suspect)

    def passive_failures(self) -> dict[Backend, PassiveCounts]:
        """Cumulative outcomes of steered connects per backend (the sockops
        program's pk_passive): one BPF_MAP_LOOKUP_BATCH syscall. {} when not
        installed."""
        return self._read_pinned("pk_passive", self._read_passive)

    def steered_sockets(self, backends: Sequence[Backend] | None = None) -> list[Any]:
        """The live steered sockets (SYN_SENT to LAST_ACK) as _netlink.SockId,
        to `backends` only when given: a sock_diag dump with each socket's
        pk_peers value (module docstring, "Fast failover")."""
        _netlink = import_netlink()  # pyroute2: ~10 MB of RSS, so only on failover

        maps = self._ensure_maps()
        if maps is None:
            return []
        wanted = None if backends is None else {encode_backend(b): b for b in backends}
        # (family, remote port) dumps: an IPv4 backend is also reached by
        # dual-stack AF_INET6 sockets, as ::ffff:a.b.c.d. Port 0: any.
        if backends is None:
            dumps = {(socket.AF_INET, 0), (socket.AF_INET6, 0)}
        else:
            dumps = {(socket.AF_INET6, b.port) for b in backends}
            dumps |= {(socket.AF_INET, b.port) for b in backends if b.family == 4}
        fd, map_id = maps.fds["pk_peers"], maps.ids["pk_peers"]
        out: list[_netlink.SockId] = []
        for family, port in sorted(dumps):
            try:
                found = _netlink.tcp_sockets(family, port, fd, map_id)
            except (OSError, AttributeError, TypeError, ValueError) as e:  # netlink, or its decoding
                raise DatapathError(f"sock_diag dump of steered sockets failed: {e}") from e
            for ss in found:
                be_raw = _PEER.unpack(ss.value[:_PEER.size])[4]
                try:
                    b = decode_backend(be_raw) if wanted is None else wanted[be_raw]
                except (KeyError, DatapathError):
                    continue  # another backend's socket
                if _netlink.unmapped(ss.sock.dst) != b.address or ss.sock.dport != b.port:
                    continue  # connected elsewhere since (the value outlives a reconnect)
                out.append(ss.sock)
        return out

    def close_connections(self, backends: Sequence[Backend]) -> int:
        """SOCK_DESTROY every live socket steered to `backends` (SYN_SENT
        and established alike), by exact 4-tuple and socket cookie:
        never a direct connection to the same address. Returns how many were
        aborted. Call after apply() took the backends out of the set."""
        if not backends:
            return 0
        _netlink = import_netlink()

        socks = self.steered_sockets(backends)
        if not socks:
            return 0
        try:
            res = _netlink.destroy_sockets(socks)
        except OSError as e:
            raise DatapathError(f"sock_diag SOCK_DESTROY failed: {e}") from e
        gone = [sid for sid, err in res.failed if err == errno.ENOENT]  # closed since the dump
        other = {e: n for e, n in res.errors().items() if e != errno.ENOENT}
        if other:
            desc = ", ".join(f"{os.strerror(e)} x{n}" for e, n in other.items())
            if res.destroyed == 0 and len(gone) == 0:
                raise DatapathError(f"sock_diag SOCK_DESTROY refused for all {len(socks)} "
                                    f"sockets: {desc} (needs CAP_NET_ADMIN and "
                                    f"CONFIG_INET_DIAG_DESTROY)")
            log.warning("close_connections: %d aborted, %d failed: %s", res.destroyed,
                        sum(other.values()), desc)
        return res.destroyed

    def close(self) -> None:
        if self._maps is not None:
            self._maps.close()
            self._maps = None
        for fd in self._links.values():
            _close_quietly(fd)
        self._links = {}
        if self._pending:
            for fd in self._pending.values():
                _close_quietly(fd)
            self._pending = None

    @classmethod
    def cleanup(cls, settings: DatapathSettings) -> list[str]:
        _validate_instance(settings.instance)
        paths = _Paths(settings.instance)
        lines: list[str] = []
        if not _bpffs_mounted() or not os.path.isdir(paths.base):
            return lines
        # Steering first, reverse translation last.
        for hook, _ in reversed(HOOKS):
            p = paths.link(hook)
            try:
                fd = bpf.obj_get(p)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                    raise DatapathError(f"cannot open pinned link {p}: {e}") from e
                continue
            try:
                li = bpf.link_info(fd)
                bpf.link_detach(fd)
                lines.append(f"cgroup link {hook} (link {li.id}, prog {li.prog_id}, "
                             f"cgroup id {li.cgroup_id}): detached")
            except OSError as e:
                if e.errno not in (errno.ENOLINK, errno.EINVAL):
                    raise DatapathError(f"cannot detach {p}: {e}") from e
            finally:
                os.close(fd)
        lines.extend(_remove_pins(paths.base))
        return lines


def _last_lines(text: str, n: int) -> str:
    return " / ".join(text.strip().splitlines()[-n:])


def _run_loader(req: dict, raise_on_error: bool = True) -> dict:
    pkg_root = str(Path(prism_kernel.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.monotonic()
    try:
        bcc = req.get("loader") == "bcc"
        # -S: the libbpf loader needs nothing from site-packages (prism_kernel
        # comes from PYTHONPATH), and skipping site saves ~15-20 ms per start.
        proc = subprocess.run([_loader_python(bcc), *(() if bcc else ("-S",)), "-m",
                               "prism_kernel.datapath.ebpf.loader"],
                              input=json.dumps(req), capture_output=True, text=True,
                              timeout=LOADER_TIMEOUT_S, env=env, cwd="/")
    except subprocess.TimeoutExpired:
        res = {"ok": False, "stage": "timeout", "error": f"loader took over {LOADER_TIMEOUT_S}s"}
    except OSError as e:
        res = {"ok": False, "stage": "spawn", "error": str(e)}
    else:
        res = None
        for line in reversed(proc.stdout.strip().splitlines()):
            try:
                res = json.loads(line)
                break
            except ValueError:
                continue
        if res is None:
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            res = {"ok": False, "stage": "loader", "error": f"exit {proc.returncode}: {tail}"}
        elif not res.get("ok") and proc.stderr.strip():
            res["error"] = f"{res.get('error')}\n" + "\n".join(proc.stderr.strip().splitlines()[-15:])
    res["wall_s"] = round(time.monotonic() - t0, 3)
    if raise_on_error and not res.get("ok"):
        raise DatapathError(f"eBPF loader failed ({res.get('stage')}): {res.get('error')}")
    return res


__all__ = ["EbpfDatapath", "encode_backend", "decode_backend", "host_netns_cookie"]
