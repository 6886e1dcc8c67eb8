"""libnftables, as the nftables data path uses it: JSON commands in, JSON
listings out, one batch per call (one nf_tables transaction).

libnftables is not thread-safe: one Nft object per data path, its calls
serialised by its lock.
"""

from __future__ import annotations

import json
import threading
from functools import lru_cache
from typing import Any

from prism_kernel._data import data_file
from prism_kernel.core.nft_plan import FAMILY, MARKER_CHAIN, MARKER_PREFIX, Template
from prism_kernel.errors import DatapathError, DatapathUnavailable

NAME = "nftables"
_ENOENT = "No such file or directory"
# Package data of an installed package, nft/ of a source checkout;
# check_available() says so when it is missing.
TEMPLATE_PATH = data_file("nft", "ruleset.json")


@lru_cache(maxsize=1)
def template() -> Template:
    """nft/ruleset.json, read once."""
    try:
        raw = json.loads(TEMPLATE_PATH.read_text())
    except FileNotFoundError as e:
        raise DatapathError(f"nft template {TEMPLATE_PATH} not found (the nft/ directory must ship "
                            f"with prism_kernel)") from e
    except (OSError, ValueError) as e:
        raise DatapathError(f"nft template {TEMPLATE_PATH} unreadable: {e}") from e
    return Template(raw, str(TEMPLATE_PATH))


def new_nft() -> Any:
    """A libnftables context with JSON output and rule handles."""
    try:
        import nftables  # Debian python3-nftables (not on PyPI)
    except ImportError as e:
        raise DatapathUnavailable(
            NAME, f"Python module 'nftables' not importable ({e}); install the Debian "
                  f"package python3-nftables and use a venv with --system-site-packages") from e
    try:
        nft = nftables.Nftables()
    except Exception as e:  # OSError when libnftables.so.1 is missing
        raise DatapathUnavailable(NAME, f"libnftables not loadable: {e}") from e
    nft.set_json_output(True)
    nft.set_handle_output(True)
    return nft


def run(nft: Any, cmds: list[dict[str, Any]]) -> tuple[int, Any, str]:
    """(rc, parsed output, error text) of one batch."""
    try:
        rc, out, err = nft.json_cmd({"nftables": cmds})
    except (ValueError, TypeError) as e:  # JSON (de)serialisation trouble
        return 1, None, str(e)
    return rc, out, err or ""


def list_objects(nft: Any, what: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The objects of one `list` command; None when the object does not exist.
    (One `list` per call: libnftables 1.0.6 answers a batch of two with ENOENT.)"""
    rc, out, err = run(nft, [{"list": what}])
    if rc != 0:
        if _ENOENT in err:
            return None
        raise DatapathError(f"nft list {json.dumps(what)} failed: {err.strip()}")
    if not isinstance(out, dict):
        return []
    return [o for o in out.get("nftables", []) if "metainfo" not in o]


def table_names(nft: Any) -> list[str]:
    """The names of every table of FAMILY, from the text listing: libnftables
    1.0.6 prints a dangling string as the `flags` of a table another process
    owns (`flags owner`) in JSON, sometimes not even valid JSON, and such a
    neighbour must not break finding our own table."""
    nft.set_json_output(False)
    try:
        rc, out, err = nft.cmd(f"list tables {FAMILY}")
    finally:
        nft.set_json_output(True)
    if rc != 0:
        raise DatapathError(f"nft list tables {FAMILY} failed: {(err or '').strip()}")
    return [parts[2] for parts in (line.split() for line in out.splitlines())
            if len(parts) == 3 and parts[:2] == ["table", FAMILY]]


def is_prism_table(nft: Any, name: str) -> bool:
    """A table of any prism-kernel instance (its marker rule), of any layout."""
    objs = list_objects(nft, {"chain": {"family": FAMILY, "table": name, "name": MARKER_CHAIN}}) or []
    return any("rule" in o and (o["rule"].get("comment") or "").startswith(MARKER_PREFIX)
               for o in objs)


class Nft:
    """One data path's libnftables context (created on first use) and the
    lock that serialises its calls."""

    def __init__(self) -> None:
        self._nft: Any = None
        self.lock = threading.Lock()

    def _handle(self) -> Any:
        if self._nft is None:
            try:
                self._nft = new_nft()
            except DatapathUnavailable as e:
                raise DatapathError(str(e)) from e
        return self._nft

    def commit(self, cmds: list[dict[str, Any]], what: str) -> None:
        """One transaction; DatapathError when the kernel rejects it (then it
        changed nothing)."""
        with self.lock:
            rc, _, err = run(self._handle(), cmds)
        if rc != 0:
            raise DatapathError(f"nftables {what} rejected, kernel state unchanged: {err.strip()}")

    def list(self, what: dict[str, Any]) -> list[dict[str, Any]] | None:
        with self.lock:
            return list_objects(self._handle(), what)

    def close(self) -> None:
        with self.lock:
            self._nft = None
