"""The short-lived loader process of the eBPF data path.

Run as `python -m prism_kernel.datapath._bpf_loader` with a JSON request on
stdin; answers one JSON object on stdout. It is the only place that imports
bcc: compiling costs ~130-150 MB of RSS, which goes away when this process
exits, so the long-lived daemon stays small.

Modes:
  load   compile bpf/prism_sock.c with its maps pinned in `map_dir` (bcc
         BPF_TABLE_PINNED: a pinned map of that path is reused, a missing one
         is created and pinned), load the five programs and pin them in
         `stage_dir`. Attaches nothing: the daemon populates the maps and then
         creates or updates the cgroup links (ebpf.py), so steering never
         starts from an empty map.
  check  compile and load with private maps, pin nothing, attach nothing; the
         programs vanish when this process exits. `check_available` uses it.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

CGROUP_SOCK_ADDR = 18  # enum bpf_prog_type
SOCK_OPS = 13

PROGRAMS = (
    # name, program type, expected attach type (enum bpf_attach_type; None: none needed)
    ("connect4", CGROUP_SOCK_ADDR, 10),      # BPF_CGROUP_INET4_CONNECT
    ("connect6", CGROUP_SOCK_ADDR, 11),      # BPF_CGROUP_INET6_CONNECT
    ("getpeername4", CGROUP_SOCK_ADDR, 29),  # BPF_CGROUP_INET4_GETPEERNAME
    ("getpeername6", CGROUP_SOCK_ADDR, 30),  # BPF_CGROUP_INET6_GETPEERNAME
    ("sockops", SOCK_OPS, None),             # attached as BPF_CGROUP_SOCK_OPS (3)
)


def _c_string(s: str) -> str:
    if any(c in s for c in '"\\\n'):
        raise ValueError(f"unsafe path for a C string: {s!r}")
    return f'"{s}"'


def run(req: dict) -> dict:
    t0 = time.monotonic()
    try:
        from bcc import BPF  # noqa: PLC0415 - only ever imported here
    except ImportError as e:
        return {"ok": False, "stage": "import", "error": f"cannot import bcc: {e}"}
    t_import = time.monotonic() - t0

    with open(req["source"]) as f:
        text = f.read()
    cflags = [f"-DPK_LAYOUT={int(req['layout'])}"]
    if req.get("suspect_ns") is not None:  # ebpf.SUSPECT_WINDOW_S; the C default otherwise
        cflags.append(f"-DPK_SUSPECT_NS={int(req['suspect_ns'])}ULL")
    mode = req.get("mode", "load")
    if mode == "load":
        map_dir = req["map_dir"]
        os.makedirs(map_dir, mode=0o700, exist_ok=True)
        cflags.append(f"-DPK_MAP_DIR={_c_string(map_dir)}")

    t1 = time.monotonic()
    try:
        bpf = BPF(text=text, cflags=cflags)
    except Exception as e:  # bcc raises plain Exception on compile errors
        return {"ok": False, "stage": "compile", "error": str(e)}
    t_compile = time.monotonic() - t1

    t2 = time.monotonic()
    fds: dict[str, int] = {}
    try:
        for name, prog_type, attach_type in PROGRAMS:
            if attach_type is None:
                fn = bpf.load_func(name, prog_type)
            else:
                fn = bpf.load_func(name, prog_type, attach_type=attach_type)
            fds[name] = fn.fd
    except Exception as e:
        return {"ok": False, "stage": "load", "error": str(e)}
    t_load = time.monotonic() - t2

    from prism_kernel.datapath import _bpfsys  # noqa: PLC0415

    progs: dict[str, int] = {}
    for name, fd in fds.items():
        progs[name] = _bpfsys.prog_info(fd).id
    if mode == "load":
        stage_dir = req["stage_dir"]
        os.makedirs(stage_dir, mode=0o700, exist_ok=True)
        for name, fd in fds.items():
            _bpfsys.obj_pin(fd, os.path.join(stage_dir, name))
    return {
        "ok": True,
        "progs": progs,
        "import_s": round(t_import, 3),
        "compile_s": round(t_compile, 3),
        "load_s": round(t_load, 3),
        "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


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
