"""The daemon's run directory (/run/<instance>/): the lock that keeps a second
daemon out, and the state file `status` reads."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

from prism_kernel.errors import LockError

LOCK_FILE = "daemon.lock"
STATE_FILE = "state.json"
# Every file prism-kernel writes in its run directory (cleanup removes only these).
RUN_FILES = (LOCK_FILE, STATE_FILE, "sysctl.json")


class DaemonLock:
    """An flock on <run_dir>/daemon.lock, held for the daemon's lifetime.

    The kernel drops it when the process dies, even on SIGKILL, so a crashed
    daemon never blocks its successor."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self, wait: float = 0.5) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
                # `status` probes the lock for an instant; wait that out.
                if time.monotonic() >= deadline:
                    holder = _read_pid(fd)
                    os.close(fd)
                    who = f" (pid {holder})" if holder else ""
                    raise LockError(
                        f"another prism-kernel daemon{who} is running for instance "
                        f"{self.path.parent.name!r} (lock {self.path}); stop it first"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _read_pid(fd: int) -> int | None:
    try:
        data = os.pread(fd, 32, 0).decode().strip()
        return int(data) if data.isdigit() else None
    except OSError:
        return None


def daemon_pid(run_dir: Path) -> int | None:
    """The pid of the daemon holding the lock, or None when no daemon runs."""
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_pid(fd) or -1  # held: a daemon runs
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def write_state(run_dir: Path, state: dict[str, Any]) -> None:
    """Replace the state file atomically: a reader sees the old or the new one."""
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    tmp = run_dir / f".{STATE_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(state, indent=1, default=str))
    os.replace(tmp, run_dir / STATE_FILE)


def read_state(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / STATE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def remove_state(run_dir: Path) -> None:
    try:
        (run_dir / STATE_FILE).unlink()
    except FileNotFoundError:
        pass
