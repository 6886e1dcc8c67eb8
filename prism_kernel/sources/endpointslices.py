"""EndpointSlices of a Service: the slices a list and then its watch events
keep (`SliceStore`), which of them kube-apiserver itself wrote
(`trusted_slices`), and the API server endpoints they name
(`endpoints_from_slices`). No I/O."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from prism_kernel.sources.endpoints import EndpointSpec, parse_endpoint
from prism_kernel.sources.kubeapi import ApiError, Gone

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# Set by the EndpointSlice controllers on the slices they manage; the slices
# kube-apiserver writes for its own Service carry no such label.
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
PORT_NAME = "https"
_FAMILY_OF = {"IPv4": 4, "IPv6": 6}


def spec_sort_key(spec: EndpointSpec) -> tuple:
    ip = spec.ip
    if ip is None:
        return (9, 0, spec.host, spec.port)
    return (ip.version, int(ip), "", spec.port)


def endpoints_from_slices(slices: Iterable[dict], port_name: str = PORT_NAME) -> list[EndpointSpec]:
    """The API server endpoints an EndpointSlice list names: every address of an
    endpoint whose ``conditions.ready`` is not false, at the slice's port named
    `port_name` (TCP). IPv4/IPv6 slices only, addresses a connection can go
    to only (parse_endpoint's rules); de-duplicated and sorted."""
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
                try:  # the addresses an endpoint in the configuration may have, no others
                    out.add(parse_endpoint(str(EndpointSpec(ip.compressed, port))))
                except ValueError:
                    continue
    return sorted(out, key=spec_sort_key)


def trusted_slices(slices: Iterable[dict], service: str, namespace: str
                   ) -> tuple[list[dict], list[tuple[dict, str]]]:
    """(the slices kube-apiserver writes for its own Service `service`, the
    others with the reason each is not one of them).

    kube-apiserver's endpoint reconciler (kubernetes
    pkg/controlplane/reconcilers/endpointsadapter.go) writes, in `namespace`:
    the slice named `service` with the addressType of the cluster's primary
    family, and on a dual-stack control plane `service`-v4 or `service`-v6
    with the other family; labels exactly {kubernetes.io/service-name:
    service}, so no endpointslice.kubernetes.io/managed-by. A secondary slice
    is only believed next to a primary one of the other family: the name is
    free on a single-stack cluster, and whoever may create EndpointSlices
    there could take it (docs/threat-model.md, "Discovery")."""
    primary: dict | None = None
    candidates: list[tuple[dict, str | None]] = []
    for sl in slices:
        md = sl.get("metadata") if isinstance(sl.get("metadata"), dict) else {}
        labels = md.get("labels") if isinstance(md.get("labels"), dict) else {}
        name, family = md.get("name"), _FAMILY_OF.get(sl.get("addressType"))
        why = None
        if md.get("namespace") not in (None, namespace):
            why = f"namespace {md.get('namespace')!r}, not {namespace!r}"
        elif MANAGED_BY_LABEL in labels:
            why = (f"label {MANAGED_BY_LABEL}={labels[MANAGED_BY_LABEL]!r}: a controller's slice "
                   "(kube-apiserver's own carry no managed-by label)")
        elif name == service:
            if family is None:
                why = f"addressType {sl.get('addressType')!r}: kube-apiserver's slice is IPv4 or IPv6"
            else:
                primary = sl
        elif name in (f"{service}-v4", f"{service}-v6"):
            if family != int(name[-1]):
                why = f"addressType {sl.get('addressType')!r} in a slice named {name!r}"
        else:
            why = f"name {name!r}: kube-apiserver writes {service!r}, {service + '-v4'!r} or {service + '-v6'!r}"
        candidates.append((sl, why))
    trusted: list[dict] = []
    rejected: list[tuple[dict, str]] = []
    primary_family = _FAMILY_OF.get(primary.get("addressType")) if primary is not None else None
    for sl, why in candidates:
        if why is None and sl is not primary:  # a secondary slice
            name = sl["metadata"]["name"]
            if primary_family is None:
                why = f"secondary slice {name!r} without kube-apiserver's primary slice {service!r}"
            elif _FAMILY_OF.get(sl.get("addressType")) == primary_family:
                why = f"secondary slice {name!r} of the primary family IPv{primary_family}"
        if why is None:
            trusted.append(sl)
        else:
            rejected.append((sl, why))
    return trusted, rejected


class SliceStore:
    """The EndpointSlices selected by ``kubernetes.io/service-name=SERVICE``,
    by (namespace, name), with the resourceVersion to watch from. Every
    selected slice is kept; only those `trusted_slices` accepts name
    endpoints, and each other one is logged once per resourceVersion."""

    def __init__(self, service: str, log: Any, namespace: str = "default"):
        self.service = service
        self.namespace = namespace
        self.log = log
        self.slices: dict[tuple[str, str], dict] = {}
        self.resource_version: str | None = None
        self.events = 0
        self.bookmarks = 0
        self.ignored = 0  # selected slices not trusted, at the last endpoints()
        self._logged: dict[tuple[str, str], str | None] = {}  # ignored slice -> its resourceVersion logged

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
        """The endpoints of the trusted slices; the others are logged
        (`discovery_slice_ignored`, once per slice and resourceVersion)."""
        trusted, rejected = trusted_slices(self.slices.values(), self.service, self.namespace)
        logged: dict[tuple[str, str], str | None] = {}
        for sl, why in rejected:
            key, md = _key(sl), sl.get("metadata") or {}
            rv = md.get("resourceVersion")
            logged[key] = rv
            if key in self._logged and self._logged[key] == rv:
                continue
            labels = md.get("labels") if isinstance(md.get("labels"), dict) else {}
            self.log.warn("discovery_slice_ignored", namespace=key[0], name=key[1],
                          address_type=str(sl.get("addressType")), managed_by=labels.get(MANAGED_BY_LABEL),
                          resource_version=rv, reason=why,
                          addresses=",".join(map(str, endpoints_from_slices([sl], port_name))) or None)
        self._logged = logged
        self.ignored = len(rejected)
        return endpoints_from_slices(trusted, port_name)

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
