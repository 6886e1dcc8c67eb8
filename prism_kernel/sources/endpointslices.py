"""EndpointSlices of a Service: the slices a list and then its watch events
keep (`SliceStore`), and the API server endpoints they name
(`endpoints_from_slices`). No I/O."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from prism_kernel.sources.endpoints import EndpointSpec
from prism_kernel.sources.kubeapi import ApiError, Gone

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PORT_NAME = "https"


def spec_sort_key(spec: EndpointSpec) -> tuple:
    ip = spec.ip
    if ip is None:
        return (9, 0, spec.host, spec.port)
    return (ip.version, int(ip), "", spec.port)


def endpoints_from_slices(slices: Iterable[dict], port_name: str = PORT_NAME) -> list[EndpointSpec]:
    """The API server endpoints an EndpointSlice list names: every address of an
    endpoint whose ``conditions.ready`` is not false, at the slice's port named
    `port_name` (TCP). IPv4/IPv6 slices only; de-duplicated and sorted."""
    out: set[EndpointSpec] = set()
    for sl in slices:
        if not isinstance(sl, dict):
            continue
        family = {"IPv4": 4, "IPv6": 6}.get(sl.get("addressType"))
        if family is None:  # FQDN (or unknown): not an address we can steer to
            continue
        port = None
        for p in sl.get("ports") or ():
            if isinstance(p, dict) and p.get("name", "") == port_name \
                    and (p.get("protocol") or "TCP") == "TCP":
                port = p.get("port")
                break
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            continue
        for ep in sl.get("endpoints") or ():
            if not isinstance(ep, dict):
                continue
            cond = ep.get("conditions") or {}
            if isinstance(cond, dict) and cond.get("ready") is False:
                continue
            for addr in ep.get("addresses") or ():
                try:
                    ip = ipaddress.ip_address(str(addr))
                except ValueError:
                    continue
                if ip.version != family:
                    continue
                out.add(EndpointSpec(ip.compressed, port))
    return sorted(out, key=spec_sort_key)


class SliceStore:
    """The EndpointSlices selected by ``kubernetes.io/service-name=SERVICE``,
    by (namespace, name), with the resourceVersion to watch from."""

    def __init__(self, service: str, log: Any):
        self.service = service
        self.log = log
        self.slices: dict[tuple[str, str], dict] = {}
        self.resource_version: str | None = None
        self.events = 0
        self.bookmarks = 0

    def replace(self, items: Iterable[Any], resource_version: str) -> None:
        """A list: everything it holds, and its resourceVersion."""
        self.slices = {}
        for item in items:
            if isinstance(item, dict):
                self._put(item)
        self.resource_version = resource_version

    def apply(self, ev: Any) -> bool:
        """One watch event; True when the selected slices changed. An ERROR
        event raises: Gone for 410 (relist), ApiError otherwise."""
        if not isinstance(ev, dict):
            raise ApiError("watch event is not an object")
        typ, obj = ev.get("type"), ev.get("object")
        if not isinstance(obj, dict):
            raise ApiError(f"watch event {typ!r} without an object")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if typ == "ERROR":
            code, reason = obj.get("code"), obj.get("reason")
            msg = obj.get("message") or reason or "watch error"
            if code == 410 or reason in ("Expired", "Gone"):
                raise Gone(f"{code} {reason}: {msg}")
            raise ApiError(f"watch error {code} {reason}: {msg}", status=code)
        if typ == "BOOKMARK":
            self.bookmarks += 1
            if rv:
                self.resource_version = str(rv)
            return False
        if typ in ("ADDED", "MODIFIED", "DELETED"):
            self.events += 1
            if rv:
                self.resource_version = str(rv)
            if typ == "DELETED":
                return self.slices.pop(_key(obj), None) is not None
            return self._put(obj)
        self.log.warn("discovery_unknown_event", type=str(typ))
        return False

    def endpoints(self, port_name: str = PORT_NAME) -> list[EndpointSpec]:
        return endpoints_from_slices(self.slices.values(), port_name)

    def _put(self, obj: dict) -> bool:
        key = _key(obj)
        labels = (obj.get("metadata") or {}).get("labels") or {}
        if labels.get(SERVICE_NAME_LABEL) != self.service:  # no longer selected
            return self.slices.pop(key, None) is not None
        self.slices[key] = obj
        return True


def _key(obj: dict) -> tuple[str, str]:
    md = obj.get("metadata") or {}
    return str(md.get("namespace") or ""), str(md.get("name") or "")
