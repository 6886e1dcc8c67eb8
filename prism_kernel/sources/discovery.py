"""Endpoint discovery: `EndpointSliceWatcher` lists and then watches the
EndpointSlices of Service `kubernetes` through the daemon's own endpoint
(``https://127.0.0.1:PORT``) and reports the API servers they name.
docs/design/endpoint-discovery.md says why it works this way.

Invariants:

* an empty list is never reported: the last one is kept (and logged);
* every reported list is saved to the cache before the callback runs, and
  `load_cached()` makes the saved list the baseline at start;
* a relist never goes back in time (no resourceVersion: a quorum read); a 410
  relists at once, a second one in a row waits for the backoff;
* every other failure reconnects with capped exponential backoff and jitter,
  the watcher outlives all of them; a watch silent past its timeout plus a
  grace is dropped.

The modules it uses: kubeconfig (credentials), kubeapi (GETs on one kept-alive
connection), endpointslices (the slice store, slices -> endpoints),
jsonstream (watch events out of the chunked body), discovery_cache (the file).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from prism_kernel import __version__
from prism_kernel.errors import PrismError
from prism_kernel.probing.http_client import HttpError
from prism_kernel.sources.discovery_cache import EndpointCache, iso
from prism_kernel.sources.endpoints import EndpointSpec
from prism_kernel.sources.endpointslices import PORT_NAME, SERVICE_NAME_LABEL, SliceStore, spec_sort_key
from prism_kernel.sources.jsonstream import JsonObjectStream
from prism_kernel.sources.kubeapi import ApiError, Gone, KubeApiClient, NullLog, error_from

# config.py and tests/test_manifests.py read kubeconfigs through this module.
from prism_kernel.sources.kubeconfig import KubeconfigError, load_kubeconfig  # noqa: F401

# A list of the `kubernetes` Service's slices is a few kB; the limit only
# bounds what a broken server can make us hold.
MAX_LIST_BYTES = 16 * 1024 * 1024
# One watch event is one object, and etcd refuses objects over 1.5 MiB
# (--max-request-bytes): anything larger is not an EndpointSlice event.
MAX_EVENT_BYTES = 2 * 1024 * 1024

OnChange = Callable[[list[EndpointSpec]], "None | Awaitable[None]"]


class Backoff:
    """Capped exponential backoff with jitter (each delay uniform in [d/2, d])."""

    def __init__(self, initial: float, cap: float):
        self.initial, self.cap = initial, cap
        self.failures = 0

    def next(self) -> float:
        d = min(self.cap, self.initial * (2 ** min(self.failures, 30)))
        self.failures += 1
        return random.uniform(d / 2, d)

    def reset(self) -> None:
        self.failures = 0


class EndpointSliceWatcher:
    """Lists and watches the EndpointSlices of one Service through `server`
    (the daemon's own ``https://127.0.0.1:PORT``) and reports the endpoints.

    `load_cached()` returns the list saved by an earlier run (and makes it the
    baseline); `run(on_change)` runs until cancelled and calls `on_change` with
    the new, non-empty, sorted list each time it differs from the last one
    reported (or loaded from the cache)."""

    def __init__(
        self,
        kubeconfig: str | os.PathLike,
        server: str,
        namespace: str = "default",
        service: str = "kubernetes",
        cache_file: str | os.PathLike | None = None,
        log: Any = None,
        *,
        context: str | None = None,
        tls_server_name: str | None = None,
        port_name: str = PORT_NAME,
        watch_timeout: float = 300.0,
        connect_timeout: float = 10.0,
        request_timeout: float = 30.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
    ):
        self.log = log or NullLog()
        self.api = KubeApiClient(server, str(kubeconfig), context=context, tls_server_name=tls_server_name,
                                 connect_timeout=connect_timeout, log=self.log,
                                 user_agent=f"prism-kernel/{__version__} (endpoint-discovery)")
        self.kubeconfig = str(kubeconfig)
        self.server = self.api.server
        self.namespace = namespace
        self.service = service
        self.cache = EndpointCache(Path(cache_file), namespace, service) if cache_file else None
        self.port_name = port_name
        self.watch_timeout = max(1.0, float(watch_timeout))
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.backoff = Backoff(backoff_initial, backoff_max)

        self.store = SliceStore(service, self.log, namespace)
        self._current: list[EndpointSpec] = []  # last reported (or loaded from the cache)
        self._empty = False
        # status
        self.state = "idle"
        self.source = "none"  # none | cache | api
        self.lists = 0
        self.watches = 0
        self.relists_gone = 0
        self.errors = 0
        self.last_error: str | None = None
        self.last_change_wall: float | None = None
        self.last_sync_wall: float | None = None

    # ---- public -------------------------------------------------------------

    @property
    def endpoints(self) -> list[EndpointSpec]:
        return list(self._current)

    @property
    def resource_version(self) -> str | None:
        return self.store.resource_version

    @property
    def events(self) -> int:
        return self.store.events

    @property
    def bookmarks(self) -> int:
        return self.store.bookmarks

    def load_cached(self) -> list[EndpointSpec]:
        """The list saved by the last run ([] when there is none or it is
        unusable); it becomes the baseline run() compares with."""
        if self.cache is None:
            return []
        try:
            specs, saved_at = self.cache.load()
        except (OSError, ValueError) as e:
            self.log.warn("discovery_cache_unusable", file=str(self.cache.path), error=str(e))
            return []
        if specs:
            self._current = specs
            self.source = "cache"
            self.log.info("discovery_cache_loaded", file=str(self.cache.path),
                          endpoints=",".join(map(str, specs)), saved_at=saved_at)
        return list(specs)

    def status(self) -> dict:
        return {
            "server": self.server,
            "namespace": self.namespace,
            "service": self.service,
            "state": self.state,
            "source": self.source,
            "endpoints": [str(s) for s in self._current],
            "resource_version": self.resource_version,
            "last_change_at": iso(self.last_change_wall),
            "last_sync_at": iso(self.last_sync_wall),
            "lists": self.lists,
            "watches": self.watches,
            "events": self.events,
            "bookmarks": self.bookmarks,
            "relists_gone": self.relists_gone,
            "ignored_slices": self.store.ignored,
            "errors": self.errors,
            "last_error": self.last_error,
        }

    async def run(self, on_change: OnChange) -> None:
        """List, then watch, forever (until cancelled)."""
        loop = asyncio.get_running_loop()
        self.log.info("discovery_start", server=self.server, namespace=self.namespace,
                      service=self.service, kubeconfig=self.kubeconfig)
        try:
            while True:
                try:
                    if self.store.resource_version is None:
                        self.state = "listing"
                        await self._list(on_change)
                    self.state = "watching"
                    started = loop.time()
                    before = self.events + self.bookmarks
                    await self._watch(on_change)
                    # Ended by the server (timeoutSeconds): watch again at once,
                    # unless it ended at once with nothing said (no hot loop).
                    if loop.time() - started >= 1.0 or self.events + self.bookmarks > before:
                        self.backoff.reset()
                        continue
                    raise ApiError("watch ended at once")
                except Gone as e:
                    self.relists_gone += 1
                    self.log.info("discovery_relist", reason=str(e), resource_version=self.resource_version)
                    self.store.resource_version = None
                    self.api.close()
                    if self.backoff.failures == 0:
                        self.backoff.failures = 1  # relist at once; a second 410 in a row waits
                        continue
                    delay = self.backoff.next()
                except Exception as e:  # noqa: BLE001 - the watcher must outlive any failure
                    # Network, TLS, HTTP status, timeouts, a document that is not
                    # what we expect: all are retried with backoff.
                    self.api.close()
                    self.errors += 1
                    self.last_error = describe(e)
                    delay = self.backoff.next()
                    if isinstance(e, ApiError) and e.retry_after:
                        delay = max(delay, min(e.retry_after, self.backoff.cap))
                    self.log.warn("discovery_error", error=self.last_error, phase=self.state,
                                  retry_in_s=round(delay, 3), failures=self.backoff.failures)
                self.state = "backoff"
                await asyncio.sleep(delay)
        finally:
            self.api.close()
            self.state = "stopped"

    # ---- list and watch ---------------------------------------------------------

    def _path(self, **params: str) -> str:
        q = {"labelSelector": f"{SERVICE_NAME_LABEL}={self.service}", **params}
        return (f"/apis/discovery.k8s.io/v1/namespaces/{self.namespace}/endpointslices?"
                + urlencode(q))

    async def _list(self, on_change: OnChange) -> None:
        async with asyncio.timeout(self.connect_timeout + self.request_timeout):
            # No resourceVersion: the most recent list (a quorum read), so a
            # relist after 410 or a restart never goes back in time.
            conn, resp = await self.api.get(self._path())
            if resp.status != 200:  # a 410 too: a list has no resourceVersion to be too old
                raise await error_from(conn, resp)
            body = await conn.read_body(MAX_LIST_BYTES)
        doc = json.loads(body)
        if not isinstance(doc, dict) or not isinstance(doc.get("items", []), list):
            raise ApiError("the list is not an EndpointSliceList")
        rv = (doc.get("metadata") or {}).get("resourceVersion")
        if not rv:
            raise ApiError("the list has no metadata.resourceVersion")
        self.store.replace(doc.get("items") or [], str(rv))
        self.lists += 1
        self.last_sync_wall = time.time()
        self.log.info("discovery_listed", slices=len(self.store.slices), resource_version=self.resource_version,
                      peer=self.api.peer)
        await self._report(on_change)

    async def _watch(self, on_change: OnChange) -> None:
        timeout_s = max(1, round(self.watch_timeout * random.uniform(1.0, 1.25)))
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout + self.request_timeout):
            conn, resp = await self.api.get(
                self._path(watch="1", resourceVersion=self.resource_version or "",
                           allowWatchBookmarks="true", timeoutSeconds=str(timeout_s)))
            if resp.status == 410:
                await error_from(conn, resp)
                raise Gone("HTTP 410 on the watch")
            if resp.status != 200:
                raise await error_from(conn, resp)
        self.watches += 1
        # The server ends the watch after timeout_s; past that (plus a grace) it
        # is a connection that died without a word.
        deadline = loop.time() + timeout_s + max(5.0, timeout_s * 0.1)
        stream = JsonObjectStream(MAX_EVENT_BYTES)
        async with asyncio.timeout_at(deadline):
            while (data := await conn.read_some()) is not None:
                try:
                    events = stream.feed(data)
                except ValueError as e:
                    raise ApiError(f"watch stream: {e}") from None
                changed = False
                for ev in events:
                    changed |= self.store.apply(ev)
                if changed:
                    self.last_sync_wall = time.time()
                    await self._report(on_change)

    async def _report(self, on_change: OnChange) -> None:
        specs = self.store.endpoints(self.port_name)
        if not specs:
            if not self._empty:
                self._empty = True
                self.log.warn("discovery_empty", slices=len(self.store.slices), ignored=self.store.ignored,
                              keeping=",".join(map(str, self._current)) or "nothing",
                              reason="no ready endpoint in kube-apiserver's EndpointSlices; "
                                     "the last list is kept")
            return
        self._empty = False
        self.source = "api"
        if specs == self._current:
            return
        old = set(self._current)
        self._current = specs
        self.last_change_wall = time.time()
        self.log.info("discovered", endpoints=",".join(map(str, specs)),
                      added=",".join(str(s) for s in specs if s not in old) or None,
                      removed=",".join(str(s) for s in sorted(old - set(specs), key=spec_sort_key)) or None,
                      resource_version=self.resource_version)
        self._save_cache(specs)
        try:
            res = on_change(list(specs))
            if isinstance(res, Awaitable):
                await res
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the watch must go on
            self.log.error("discovery_callback_failed", error=f"{type(e).__name__}: {e}")

    def _save_cache(self, specs: list[EndpointSpec]) -> None:
        if self.cache is None:
            return
        try:
            self.cache.save(specs, self.resource_version)
        except OSError as e:
            self.log.warn("discovery_cache_write_failed", file=str(self.cache.path), error=str(e))


def describe(e: BaseException) -> str:
    """A short, stable text for a failure (the discovery_error log line, status)."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"tls: {e.verify_message or e.reason}"
    if isinstance(e, ssl.SSLError):
        return f"tls: {e.reason or e}"
    if isinstance(e, TimeoutError):
        return "timeout"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, ConnectionResetError):
        return "connection reset"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    if isinstance(e, (PrismError, HttpError)):
        return str(e)
    return f"{type(e).__name__}: {e}"
