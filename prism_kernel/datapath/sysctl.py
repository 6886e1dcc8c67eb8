"""Save and restore the global sysctls a data path changes.

A data path that flips a host-wide knob (the nftables data path needs
`net.ipv4.conf.all.route_localnet=1`) records the value it found in
`/run/<instance>/sysctl.json` *before* the first write, and `restore()` puts
it back when the data path is removed. Rules:

- The saved value is the one from before *any* prism-kernel instance touched
  the knob: when a second instance finds the knob already changed by a first
  one, it copies the first instance's saved original instead of saving the
  changed value (otherwise the last instance to clean up would "restore" the
  value another instance wrote).
- `restore()` leaves the knob alone while someone else still needs it (the
  caller says who: e.g. another instance's nft table is still installed); the
  last user restores it.
- `restore()` never overwrites a value an operator set after us: it only
  writes when the knob still holds the value we applied.
- The state file is written atomically (tmp + rename) and survives daemon
  restarts (it lives under /run, so not reboots; neither does the knob).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from prism_kernel.errors import DatapathError

# Overridable by tests (monkeypatch) so that a test run never touches the
# state of a live daemon.
RUN_ROOT = Path("/run")
PROC_SYS = Path("/proc/sys")
STATE_FILE = "sysctl.json"
_FORMAT = 1


def _path(name: str) -> Path:
    if not name or "/" in name or ".." in name.split("."):
        raise ValueError(f"bad sysctl name {name!r}")
    return PROC_SYS / name.replace(".", "/")


def read(name: str) -> str:
    """Current value of a sysctl, whitespace-normalised ("32768 60999")."""
    try:
        return " ".join(_path(name).read_text().split())
    except OSError as e:
        raise DatapathError(f"cannot read sysctl {name}: {e.strerror or e}") from e


def write(name: str, value: str) -> None:
    try:
        _path(name).write_text(f"{value}\n")
    except OSError as e:
        raise DatapathError(f"cannot set sysctl {name}={value}: {e.strerror or e}") from e


def state_path(instance: str) -> Path:
    return RUN_ROOT / instance / STATE_FILE


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        # A corrupt file must not block cleanup; treat as "nothing saved".
        return {}
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        return {}
    saved = data.get("sysctls")
    return saved if isinstance(saved, dict) else {}


def _store(path: Path, saved: dict) -> None:
    if not saved:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    body = json.dumps({"format": _FORMAT, "writer": "prism-kernel", "sysctls": saved},
                      indent=2, sort_keys=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".sysctl.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(body + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def saved(instance: str) -> dict[str, dict[str, str]]:
    """What `instance` recorded: {name: {"original": v, "applied": v}}."""
    return _load(state_path(instance))


def _original_from_other_instances(instance: str, name: str) -> str | None:
    try:
        others = sorted(RUN_ROOT.glob(f"*/{STATE_FILE}"))
    except OSError:
        return None
    for p in others:
        if p.parent.name == instance:
            continue
        entry = _load(p).get(name)
        if isinstance(entry, dict) and isinstance(entry.get("original"), str):
            return entry["original"]
    return None


def ensure(instance: str, name: str, value: str) -> bool:
    """Make `name` hold `value`, saving the pre-prism-kernel value first.

    Returns True when the kernel was written."""
    value = " ".join(str(value).split())
    path = state_path(instance)
    entries = _load(path)
    current = read(name)
    if name not in entries:
        original = current
        if current == value:
            # Already set: by another instance (copy its saved original) or
            # by the operator (then "restoring" it means leaving it as is).
            original = _original_from_other_instances(instance, name) or current
        entries[name] = {"original": original, "applied": value}
        _store(path, entries)  # saved before the write: a crash can't lose it
    elif entries[name].get("applied") != value:
        entries[name]["applied"] = value
        _store(path, entries)
    if current == value:
        return False
    write(name, value)
    return True


def restore(instance: str, still_needed: Callable[[str], bool] | None = None,
            names: Iterable[str] | None = None) -> list[str]:
    """Put back what `instance` changed. Idempotent; a line per action.

    `still_needed(name)` -> True keeps the knob (another user remains); the
    record is dropped either way since this instance no longer needs it."""
    path = state_path(instance)
    entries = _load(path)
    lines: list[str] = []
    for name in list(names if names is not None else entries):
        entry = entries.get(name)
        if not isinstance(entry, dict):
            continue
        original, applied = entry.get("original"), entry.get("applied")
        try:
            current = read(name)
        except DatapathError as e:
            lines.append(f"sysctl {name}: not restored ({e})")
            entries.pop(name, None)
            continue
        if still_needed is not None and still_needed(name):
            lines.append(f"sysctl {name}={current} kept: still needed by another prism-kernel instance")
        elif current != applied:
            lines.append(f"sysctl {name}={current} left alone: changed by someone else since we set {applied}")
        elif original is not None and original != current:
            write(name, original)
            lines.append(f"restored sysctl {name}={original} (was {current})")
        entries.pop(name, None)
    _store(path, entries)
    try:
        path.parent.rmdir()  # only if empty: the daemon may keep other files there
    except OSError:
        pass
    return lines
