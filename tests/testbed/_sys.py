"""Low-level helpers of the testbed: `ip` commands, nftables JSON batches,
process bookkeeping, the guard routes for the test address ranges.

Everything here acts only on names and addresses the testbed owns:
namespaces ``{prefix}-*``, host veths ``{prefix}h<N>``, the host nft table
``{prefix}_testbed``, addresses in 198.18.0.0/16 and 2001:2::/48.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

STATE_ROOT = Path("/run/prism-kernel-testbed")
ROUTE_DIR = STATE_ROOT / "guard-routes"
# The whole benchmarking ranges: a test host that failed to come up yields
# "no route" instead of traffic leaving the machine.
GUARD_ROUTES = {4: "198.18.0.0/15", 6: "2001:2::/48"}
FAKEAPI_MODULE = "tests.testbed.fakeapi"
REPO_ROOT = Path(__file__).resolve().parents[2]


class TestbedError(RuntimeError):
    """Setting up, switching or tearing down the testbed failed."""

    __test__ = False  # not a pytest test class


# --- commands ----------------------------------------------------------------


def run(argv: list[str], *, check: bool = True, input: str | None = None,
        timeout: float = 30.0) -> subprocess.CompletedProcess:
    try:
        cp = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as e:
        raise TestbedError(f"{argv[0]} not found: {e}") from None
    if check and cp.returncode != 0:
        raise TestbedError(f"{' '.join(argv)} failed ({cp.returncode}): {cp.stderr.strip()}")
    return cp


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(["ip", *args], check=check)


def ip_json(*args: str) -> list:
    cp = ip("-j", *args, check=False)
    if cp.returncode != 0 or not cp.stdout.strip():
        return []
    return json.loads(cp.stdout)


def netns_list() -> list[str]:
    cp = ip("netns", "list", check=False)
    # lines look like "name" or "name (id: 3)"
    return [line.split()[0] for line in cp.stdout.splitlines() if line.strip()]


def link_names() -> list[str]:
    return [link["ifname"] for link in ip_json("link", "show")]


def netns_pids(ns: str) -> list[int]:
    cp = ip("netns", "pids", ns, check=False)
    return [int(x) for x in cp.stdout.split() if x.isdigit()]


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    pp = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pp if pp else "")
    return env


def ns_python(ns: str | None, module: str, args: list[str]) -> list[str]:
    argv = [sys.executable, "-m", module, *args]
    if ns:
        argv = ["ip", "netns", "exec", ns, *argv]
    return argv


# --- nftables ------------------------------------------------------------------


def nft_apply(batch: dict, ns: str | None) -> None:
    """Apply one nftables JSON batch atomically, in namespace `ns` (via
    `ip netns exec ... python -m tests.testbed.nsnft`) or in this one."""
    if ns is None:
        import nftables

        nft = nftables.Nftables()
        rc, _out, err = nft.json_cmd(batch)
        if rc != 0:
            raise TestbedError(f"nftables: {err.strip()}")
        return
    cp = subprocess.run(ns_python(ns, "tests.testbed.nsnft", []), input=json.dumps(batch),
                        capture_output=True, text=True, env=python_env(), cwd=str(REPO_ROOT),
                        timeout=30)
    if cp.returncode != 0:
        raise TestbedError(f"nftables in {ns}: {cp.stderr.strip()}")


def nft_tables(ns: str | None = None) -> list[tuple[str, str]]:
    """(family, name) of the nft tables in this namespace (or `ns`)."""
    if ns is None:
        import nftables

        nft = nftables.Nftables()
        rc, out, _ = nft.json_cmd({"nftables": [{"list": {"tables": {}}}]})
    else:
        cp = subprocess.run(ns_python(ns, "tests.testbed.nsnft", []),
                            input=json.dumps({"nftables": [{"list": {"tables": {}}}]}),
                            capture_output=True, text=True, env=python_env(),
                            cwd=str(REPO_ROOT), timeout=30)
        rc, out = cp.returncode, (json.loads(cp.stdout) if cp.stdout.strip() else {})
    if rc != 0:
        return []
    return [(o["table"]["family"], o["table"]["name"])
            for o in out.get("nftables", []) if "table" in o]


def drop_table_batch(family: str, table: str, prio: int, rules: list[list[dict]]) -> dict:
    """A batch that (re)creates `table` with one prerouting chain holding `rules`
    (each a list of JSON expressions ending in a verdict), or deletes the table
    when `rules` is empty."""
    t = {"family": family, "name": table}
    cmds: list[dict] = [{"add": {"table": t}}]
    if not rules:
        cmds.append({"delete": {"table": t}})
        return {"nftables": cmds}
    chain = {"family": family, "table": table, "name": "prerouting"}
    cmds.append({"add": {"chain": {**chain, "type": "filter", "hook": "prerouting",
                                   "prio": prio, "policy": "accept"}}})
    cmds.append({"flush": {"chain": chain}})
    for expr in rules:
        cmds.append({"add": {"rule": {"family": family, "table": table,
                                      "chain": "prerouting", "expr": expr}}})
    return {"nftables": cmds}


def match(left: dict, right) -> dict:
    return {"match": {"op": "==", "left": left, "right": right}}


# --- processes -------------------------------------------------------------------


def proc_starttime(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # field 22, after the parenthesised comm (which may hold spaces)
    return int(stat.rsplit(")", 1)[1].split()[19])


def proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def is_fakeapi(pid: int, prefix: str | None = None) -> bool:
    argv = proc_cmdline(pid)
    if FAKEAPI_MODULE not in argv:
        return False
    if prefix is None:
        return True
    return any(a == "--testbed-prefix" and i + 1 < len(argv) and argv[i + 1] == prefix
               for i, a in enumerate(argv))


def kill_and_reap(pid: int, timeout: float = 5.0) -> None:
    """SIGKILL `pid` and wait until it is gone (reaped by us if it is our child)."""
    for sig in (signal.SIGKILL, signal.SIGCONT):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            wpid, _ = os.waitpid(pid, os.WNOHANG)
            if wpid == pid:
                return
        except ChildProcessError:
            pass  # not our child: poll /proc
        state = proc_state(pid)
        if state is None:
            return
        if state == "Z":  # someone else's zombie: dead, its sockets closed
            return
        time.sleep(0.005)
    raise TestbedError(f"process {pid} did not die within {timeout}s")


def fakeapi_pids(prefix: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and is_fakeapi(int(d.name), prefix):
            out.append(int(d.name))
    return out


# --- locks -----------------------------------------------------------------------


class FileLock:
    """An exclusive flock on `path`; released when closed or when the process dies."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self, timeout: float) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise TestbedError(
                        f"{self.path} is held by another live process (a testbed with the "
                        f"same prefix in another run?); waited {timeout:.0f}s") from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def __enter__(self):
        self.acquire(60.0)
        return self

    def __exit__(self, *exc):
        self.release()


# --- guard routes --------------------------------------------------------------


def _ipv6_enabled() -> bool:
    try:
        return Path("/proc/sys/net/ipv6/conf/all/disable_ipv6").read_text().strip() == "0"
    except OSError:
        return False


def _holders() -> list[Path]:
    d = ROUTE_DIR / "holders"
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for f in d.iterdir():
        m = re.fullmatch(r".+\.(\d+)\.(\d+)", f.name)
        if m and proc_starttime(int(m.group(1))) == int(m.group(2)):
            out.append(f)
        else:
            f.unlink(missing_ok=True)  # its process is gone
    return out


def _holder_file(prefix: str) -> Path:
    pid = os.getpid()
    return ROUTE_DIR / "holders" / f"{prefix}.{pid}.{proc_starttime(pid)}"


def guard_routes_acquire(prefix: str) -> None:
    """Make sure `unreachable 198.18.0.0/15` (and `2001:2::/48`) exist on the
    host; add them when missing and remember that we did (marker file), so the
    last testbed to leave removes only what a testbed added."""
    with FileLock(ROUTE_DIR / "lock"):
        _holders()
        for fam, net in GUARD_ROUTES.items():
            if fam == 6 and not _ipv6_enabled():
                continue
            if ip_json(f"-{fam}", "route", "show", "exact", net):
                continue  # present: someone's (maybe ours); never touch it
            cp = ip(f"-{fam}", "route", "add", "unreachable", net, check=False)
            if cp.returncode == 0:
                (ROUTE_DIR / f"added-v{fam}").touch()
            elif "File exists" not in cp.stderr:
                raise TestbedError(f"cannot add guard route unreachable {net}: {cp.stderr.strip()}")
        _holder_file(prefix).touch()


def guard_routes_release(prefix: str, *, all_of_prefix: bool = False) -> list[str]:
    """Drop our hold (or, for clear_stale, every dead hold); when nobody holds
    the guard routes any more, remove those a testbed added."""
    removed = []
    with FileLock(ROUTE_DIR / "lock"):
        if all_of_prefix:
            for f in (ROUTE_DIR / "holders").glob(f"{prefix}.*"):
                if f.name.startswith(f"{prefix}.{os.getpid()}."):
                    f.unlink(missing_ok=True)
        else:
            _holder_file(prefix).unlink(missing_ok=True)
        if _holders():
            return removed
        for fam, net in GUARD_ROUTES.items():
            marker = ROUTE_DIR / f"added-v{fam}"
            if not marker.exists():
                continue
            routes = ip_json(f"-{fam}", "route", "show", "exact", net)
            if any(r.get("type") == "unreachable" for r in routes):
                ip(f"-{fam}", "route", "del", "unreachable", net, check=False)
                removed.append(f"route unreachable {net}")
            marker.unlink(missing_ok=True)
    return removed
