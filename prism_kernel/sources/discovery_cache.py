"""The last discovered endpoints on disk (JSON), so that a start while the
API cannot be reached begins with them. Written atomically: a reader sees
the old file or the new one, never a part."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import stat
import tempfile
import time
from pathlib import Path

from prism_kernel.sources.endpoints import (
    MAX_BACKENDS_PER_FAMILY,
    MAX_ENDPOINT_ENTRIES,
    EndpointSpec,
    parse_endpoint,
)
from prism_kernel.sources.endpointslices import spec_sort_key

CACHE_SCHEMA = 1
# A full cache (64 IPv6 and 64 IPv4 endpoints, as save() writes it) is about 5 KB.
MAX_CACHE_BYTES = 64 * 1024


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="milliseconds")


class EndpointCache:
    """One Service's endpoints, in `path`."""

    def __init__(self, path: Path, namespace: str, service: str):
        self.path = path
        self.namespace = namespace
        self.service = service

    def load(self) -> tuple[list[EndpointSpec], str | None]:
        """(endpoints, when saved); ([], None) when there is no file. ValueError
        (or OSError) when the file cannot be used: not a regular file, larger
        than MAX_CACHE_BYTES, not JSON, another schema or Service, a value of
        the wrong type, an entry that is not an address the configuration
        would take, or more than the data paths hold. The file is the
        daemon's own, but whoever could write it must not be able to add a
        backend through it that discovery could not (docs/threat-model.md)."""
        try:
            if not stat.S_ISREG(os.stat(self.path).st_mode):
                raise ValueError("not a regular file")
            with open(self.path, "rb") as f:
                raw = f.read(MAX_CACHE_BYTES + 1)
        except FileNotFoundError:
            return [], None
        if len(raw) > MAX_CACHE_BYTES:
            raise ValueError(f"larger than {MAX_CACHE_BYTES // 1024} KiB")
        try:
            doc = json.loads(raw)
        except RecursionError:
            raise ValueError("nested too deeply") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise ValueError(f"not a JSON object but {type(doc).__name__}")
        schema = doc.get("schema")
        if type(schema) is not int or schema != CACHE_SCHEMA:
            raise ValueError(f"schema {str(schema)[:20]!r}, expected {CACHE_SCHEMA}")
        if (doc.get("namespace"), doc.get("service")) != (self.namespace, self.service):
            raise ValueError(f"it is for {str(doc.get('namespace'))[:64]}/{str(doc.get('service'))[:64]}")
        entries = doc.get("endpoints", [])
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise ValueError("endpoints is not a list of strings")
        if len(entries) > MAX_ENDPOINT_ENTRIES:
            raise ValueError(f"{len(entries)} endpoints, more than the data paths hold ({MAX_ENDPOINT_ENTRIES})")
        specs = sorted({parse_endpoint(e) for e in entries}, key=spec_sort_key)  # ValueError names the entry
        if any(s.is_name for s in specs):
            raise ValueError("it holds names, not addresses")
        for family in (4, 6):
            if sum(s.family == family for s in specs) > MAX_BACKENDS_PER_FAMILY:
                raise ValueError(f"more than {MAX_BACKENDS_PER_FAMILY} IPv{family} endpoints")
        saved_at = doc.get("updated_at")
        return specs, saved_at if isinstance(saved_at, str) else None

    def save(self, specs: list[EndpointSpec], resource_version: str | None) -> None:
        doc = {
            "schema": CACHE_SCHEMA,
            "namespace": self.namespace,
            "service": self.service,
            "updated_at": iso(time.time()),
            "resource_version": resource_version,
            "endpoints": [str(s) for s in specs],
        }
        atomic_write(self.path, (json.dumps(doc, indent=2) + "\n").encode())


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` so a reader sees the old or the new content,
    never a part (temp file in the same directory, fsync, rename, fsync dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
