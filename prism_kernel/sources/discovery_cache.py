"""The last discovered endpoints on disk (JSON), so that a start while the
API cannot be reached begins with them. Written atomically: a reader sees
the old file or the new one, never a part."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import tempfile
import time
from pathlib import Path

from prism_kernel.sources.endpoints import EndpointSpec, parse_endpoint
from prism_kernel.sources.endpointslices import spec_sort_key

CACHE_SCHEMA = 1


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
        (or OSError) when the file cannot be used: another Service's, another
        schema, names instead of addresses, not JSON."""
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return [], None
        try:
            if doc.get("schema") != CACHE_SCHEMA:
                raise ValueError(f"schema {doc.get('schema')!r}, expected {CACHE_SCHEMA}")
            if (doc.get("namespace"), doc.get("service")) != (self.namespace, self.service):
                raise ValueError(f"it is for {doc.get('namespace')}/{doc.get('service')}")
            specs = sorted({parse_endpoint(str(e)) for e in doc.get("endpoints", [])}, key=spec_sort_key)
        except (AttributeError, TypeError) as e:  # not a mapping, endpoints not a list
            raise ValueError(str(e)) from None
        if any(s.is_name for s in specs):
            raise ValueError("it holds names, not addresses")
        return specs, doc.get("updated_at")

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
