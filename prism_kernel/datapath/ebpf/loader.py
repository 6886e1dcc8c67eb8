"""The short-lived loader process of the eBPF data path.

Run as `python -m prism_kernel.datapath.ebpf.loader` with a JSON request on
stdin; answers one JSON object on stdout (diagnostics, such as a verifier log,
go to stderr). Loading runs here and not in the daemon so that a loader that
misbehaves (a crash in a C library, bcc's ~130 MB compile) costs this process
only, and the long-lived daemon stays small: it uses bpf(2) on pinned
objects (and libbpf's feature probes, bpf_features.py), never a loader.

Loaders (`loader` in the request):
  libbpf  the precompiled object (bpf/build.sh) through Debian's libbpf1 and
          ctypes: no compiler, no kernel headers, no bcc on the node.
  bcc     compile bpf/prism_sock.bpf.c (-DPK_BCC) with bcc at run time: the
          fallback for a source checkout without the object. Needs bcc and
          kernel headers.

Modes:
  load   load the five programs with their maps pinned in `map_dir` (a pinned
         map of that path is reused, a missing one created and pinned) and
         pin the programs in `stage_dir`. Attaches nothing: the daemon fills
         the maps and then creates or updates the cgroup links (ebpf.py), so
         steering never starts from an empty map.
  check  load with private maps, pin nothing, attach nothing; the programs
         vanish when this process exits.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import struct
import sys
import time

CGROUP_SOCK_ADDR = 18  # enum bpf_prog_type
SOCK_OPS = 13

# hook (the daemon's name, the pin name) -> (function in the C source,
# program type, expected attach type for bcc; libbpf takes both from SEC()).
PROGRAMS = {
    "connect4": ("connect4", CGROUP_SOCK_ADDR, 10),          # BPF_CGROUP_INET4_CONNECT
    "connect6": ("connect6", CGROUP_SOCK_ADDR, 11),          # BPF_CGROUP_INET6_CONNECT
    "getpeername4": ("getpeername4", CGROUP_SOCK_ADDR, 29),  # BPF_CGROUP_INET4_GETPEERNAME
    "getpeername6": ("getpeername6", CGROUP_SOCK_ADDR, 30),  # BPF_CGROUP_INET6_GETPEERNAME
    "sockops": ("pk_sockops", SOCK_OPS, None),               # attached as BPF_CGROUP_SOCK_OPS
}


_KEEP: list = []  # loaded objects and their buffers, alive until the process exits


class LoadError(Exception):
    def __init__(self, stage: str, error: str):
        super().__init__(f"{stage}: {error}")
        self.stage = stage
        self.error = error


def _c_string(s: str) -> str:
    if any(c in s for c in '"\\\n'):
        raise ValueError(f"unsafe path for a C string: {s!r}")
    return f'"{s}"'


# --- libbpf ------------------------------------------------------------------


def _libbpf() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError as e:
        raise LoadError("import", f"cannot load libbpf.so.1 (Debian: libbpf1): {e}") from None
    p = ctypes.c_void_p
    sigs = {
        "bpf_object__open_mem": (p, [p, ctypes.c_size_t, p]),
        "bpf_object__next_map": (p, [p, p]),
        "bpf_map__name": (ctypes.c_char_p, [p]),
        "bpf_map__is_internal": (ctypes.c_bool, [p]),
        "bpf_map__set_pin_path": (ctypes.c_int, [p, ctypes.c_char_p]),
        "bpf_map__initial_value": (p, [p, ctypes.POINTER(ctypes.c_size_t)]),
        "bpf_object__find_map_by_name": (p, [p, ctypes.c_char_p]),
        "bpf_object__load": (ctypes.c_int, [p]),
        "bpf_object__find_program_by_name": (p, [p, ctypes.c_char_p]),
        "bpf_program__fd": (ctypes.c_int, [p]),
        "bpf_object__close": (None, [p]),
        "libbpf_strerror": (ctypes.c_int, [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]),
        "libbpf_major_version": (ctypes.c_uint32, []),
        "libbpf_minor_version": (ctypes.c_uint32, []),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def _libbpf_error(lib: ctypes.CDLL, rc: int) -> str:
    # libbpf 1.x returns -errno (and sets errno); a NULL pointer sets errno.
    # Its own codes (LIBBPF_ERRNO__*, from 4000) only libbpf_strerror names.
    err = -rc if rc < 0 else ctypes.get_errno()
    buf = ctypes.create_string_buffer(256)
    text = buf.value.decode() if lib.libbpf_strerror(err, buf, len(buf)) == 0 else os.strerror(err)
    return f"{text} (errno {err})"


# pk_params in bpf/prism_sock.bpf.c: suspect_ns, layout, pad. It must be all
# of .rodata, so that its offset is 0.
_PARAMS = struct.Struct("=QII")


def load_libbpf(req: dict) -> tuple[dict[str, int], dict]:
    lib = _libbpf()
    version = f"{lib.libbpf_major_version()}.{lib.libbpf_minor_version()}"
    path = req["object"]
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise LoadError("open", f"cannot read {path}: {e}") from None
    # From memory: what is loaded is exactly what was hashed (input_sha256),
    # even if the file is replaced meanwhile (a package upgrade).
    buf = ctypes.create_string_buffer(data, len(data))
    obj = lib.bpf_object__open_mem(ctypes.addressof(buf), len(data), None)
    if not obj:
        raise LoadError("open", f"libbpf cannot open {path}: {_libbpf_error(lib, 0)}")
    _KEEP.append(buf)
    # The object stays open (its programs and maps alive) until this process
    # exits; the daemon holds the programs through their pins by then.
    rodata = lib.bpf_object__find_map_by_name(obj, b".rodata")
    size = ctypes.c_size_t(0)
    ptr = lib.bpf_map__initial_value(rodata, ctypes.byref(size)) if rodata else None
    if not ptr or size.value != _PARAMS.size:
        raise LoadError("open", f"{path}: .rodata is not pk_params alone ({size.value} bytes, "
                                f"want {_PARAMS.size}): not an object of this release")
    suspect_ns, layout, _ = _PARAMS.unpack(ctypes.string_at(ptr, _PARAMS.size))
    if layout != int(req["layout"]):
        raise LoadError("open", f"{path} was built for map layout {layout}; this release uses layout "
                                f"{req['layout']} (rebuild it: bpf/build.sh)")
    if req.get("suspect_ns") is not None:
        suspect_ns = int(req["suspect_ns"])
    ctypes.memmove(ptr, _PARAMS.pack(suspect_ns, layout, 0), _PARAMS.size)
    if req.get("mode", "load") == "load":
        map_dir = req["map_dir"]
        os.makedirs(map_dir, mode=0o700, exist_ok=True)
        m = lib.bpf_object__next_map(obj, None)
        while m:
            if not lib.bpf_map__is_internal(m):
                name = lib.bpf_map__name(m).decode()
                rc = lib.bpf_map__set_pin_path(m, os.fsencode(os.path.join(map_dir, name)))
                if rc:
                    raise LoadError("open", f"pin path of map {name}: {_libbpf_error(lib, rc)}")
            m = lib.bpf_object__next_map(obj, m)
    rc = lib.bpf_object__load(obj)
    if rc:
        # libbpf printed the reason (and a rejected program's verifier log) on stderr.
        raise LoadError("load", f"libbpf {version} could not load {path}: {_libbpf_error(lib, rc)}")
    fds: dict[str, int] = {}
    for hook, (func, _, _) in PROGRAMS.items():
        prog = lib.bpf_object__find_program_by_name(obj, func.encode())
        fd = lib.bpf_program__fd(prog) if prog else -1
        if fd < 0:
            raise LoadError("load", f"{path} has no program {func}")
        fds[hook] = fd
    return fds, {"libbpf_version": version, "input_sha256": hashlib.sha256(data).hexdigest()}


# --- bcc ---------------------------------------------------------------------


def load_bcc(req: dict) -> tuple[dict[str, int], dict]:
    t0 = time.monotonic()
    try:
        from bcc import BPF  # noqa: PLC0415 - only ever imported here
    except ImportError as e:
        raise LoadError("import", f"cannot import bcc (Debian: python3-bpfcc): {e}") from None
    t_import = time.monotonic() - t0
    with open(req["source"], "rb") as f:
        raw = f.read()
    text = raw.decode()
    cflags = ["-DPK_BCC", f"-DPK_LAYOUT={int(req['layout'])}"]
    if req.get("suspect_ns") is not None:
        cflags.append(f"-DPK_SUSPECT_NS={int(req['suspect_ns'])}ULL")
    if req.get("mode", "load") == "load":
        map_dir = req["map_dir"]
        os.makedirs(map_dir, mode=0o700, exist_ok=True)
        cflags.append(f"-DPK_MAP_DIR={_c_string(map_dir)}")
    t1 = time.monotonic()
    try:
        bpf = BPF(text=text, cflags=cflags)
    except Exception as e:  # bcc raises plain Exception on compile errors
        raise LoadError("compile", str(e)) from None
    t_compile = time.monotonic() - t1
    fds: dict[str, int] = {}
    for hook, (func, prog_type, attach_type) in PROGRAMS.items():
        try:
            if attach_type is None:
                fn = bpf.load_func(func, prog_type)
            else:
                fn = bpf.load_func(func, prog_type, attach_type=attach_type)
        except Exception as e:
            raise LoadError("load", str(e)) from None
        fds[hook] = fn.fd
    _KEEP.append(bpf)  # its fds live as long as it does
    return fds, {"import_s": round(t_import, 3), "compile_s": round(t_compile, 3),
                 "input_sha256": hashlib.sha256(raw).hexdigest()}


LOADERS = {"libbpf": load_libbpf, "bcc": load_bcc}


def run(req: dict) -> dict:
    loader = req.get("loader", "libbpf")
    if loader not in LOADERS:
        return {"ok": False, "stage": "request", "error": f"unknown loader {loader!r}"}
    from prism_kernel.datapath.ebpf import bpfsys as _bpfsys  # noqa: PLC0415

    _bpfsys.raise_memlock()
    t0 = time.monotonic()
    try:
        fds, info = LOADERS[loader](req)
    except LoadError as e:
        return {"ok": False, "loader": loader, "stage": e.stage, "error": e.error}
    t_load = time.monotonic() - t0
    progs = {hook: _bpfsys.prog_info(fd).id for hook, fd in fds.items()}
    if req.get("mode", "load") == "load":
        stage_dir = req["stage_dir"]
        os.makedirs(stage_dir, mode=0o700, exist_ok=True)
        for hook, fd in fds.items():
            _bpfsys.obj_pin(fd, os.path.join(stage_dir, hook))
    return {
        "ok": True,
        "loader": loader,
        "progs": progs,
        "load_s": round(t_load, 3),
        "maxrss_kb": _peak_rss_kb(),
        **info,
    }


def _peak_rss_kb() -> int:
    """VmHWM: this process image's peak (ru_maxrss would carry the parent's
    peak over the exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main() -> int:
    req = json.load(sys.stdin)
    try:
        res = run(req)
    except Exception as e:  # report, never a traceback on stdout
        res = {"ok": False, "stage": "loader", "error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0 if res.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
