"""Which loader puts the programs in the kernel, and running it.

Loading never runs in the long-lived daemon: `run_loader()` starts
`python -m prism_kernel.datapath.ebpf.loader` (loader.py, the child), which
loads the programs with their maps pinned, pins the programs in a staging
dir and exits. Its loader is libbpf with the precompiled object (bpf/build.sh
at install time: no compiler, headers or bcc on the node), or bcc compiling
the same source at run time (the fallback; `ebpf.loader`, `loader_plan()`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import prism_kernel
from prism_kernel._data import data_file
from prism_kernel.errors import DatapathError, DatapathUnavailable

LOADER_TIMEOUT_S = 120.0
OBJECT_NAME = "prism_sock.bpf.o"   # built by bpf/build.sh
SOURCE_NAME = "prism_sock.bpf.c"
LOADER_NAMES = ("libbpf", "bcc")
LOADER_CODES = {"libbpf": 1, "bcc": 2}  # in the meta map
DEBIAN_BCC = "/usr/lib/python3/dist-packages/bcc/__init__.py"  # what /usr/bin/python3 imports


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
    python = loader_python(bcc=True)
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
    this order by install()). Raises DatapathUnavailable, with every reason,
    when none can run here."""
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


def loader_python(bcc: bool) -> str:
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


def last_lines(text: str, n: int) -> str:
    return " / ".join(text.strip().splitlines()[-n:])


def run_loader(req: dict, raise_on_error: bool = True) -> dict:
    """Run the loader child with `req` (loader.py documents it); its JSON
    answer, with the wall time. A loader that fails is an answer with ok
    False, or DatapathError when `raise_on_error`."""
    pkg_root = str(Path(prism_kernel.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.monotonic()
    try:
        bcc = req.get("loader") == "bcc"
        # -S: the libbpf loader needs nothing from site-packages (prism_kernel
        # comes from PYTHONPATH), and skipping site saves ~15-20 ms per start.
        proc = subprocess.run([loader_python(bcc), *(() if bcc else ("-S",)), "-m",
                               "prism_kernel.datapath.ebpf.loader"],
                              input=json.dumps(req), capture_output=True, text=True,
                              timeout=LOADER_TIMEOUT_S, env=env, cwd="/", check=False)
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
