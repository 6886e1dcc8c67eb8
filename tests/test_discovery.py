"""Endpoint discovery from the EndpointSlices of Service `kubernetes`
(prism_kernel.sources: discovery, endpointslices, kubeconfig, kubeapi,
jsonstream, discovery_cache).

Unit tests (no network): slices -> endpoints, kubeconfig variants, the cache,
the slice store, the watch stream framing.
Integration tests (root): the watcher against the testbed's fake API servers
directly (no prism-kernel daemon, no kernel state), and kubectl as a real
client-go against the same fake.

    sudo .venv/bin/python -m pytest -q tests/test_discovery.py

The testbed runs with prefix "pkg" and net_offset=60 (198.18.61.0/24 ...), so it
can run while other suites use theirs. Marked `kernel`: the testbed needs
root (network namespaces), though no daemon instance is touched.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from prism_kernel.sources.discovery import MAX_EVENT_BYTES, Backoff, EndpointSliceWatcher
from prism_kernel.sources.discovery_cache import atomic_write
from prism_kernel.sources.endpoints import EndpointSpec
from prism_kernel.sources.endpointslices import SliceStore, endpoints_from_slices, spec_sort_key
from prism_kernel.sources.jsonstream import JsonObjectStream
from prism_kernel.sources.kubeapi import ApiError, Gone, tune_socket
from prism_kernel.sources.kubeconfig import KubeconfigError, load_kubeconfig

PREFIX = "pkg"
NET_OFFSET = 60
SELECTOR = "kubernetes.io/service-name=kubernetes"


# --------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------


def es(addresses, port=6443, *, family="IPv4", ready=None, name="kubernetes", port_name="https",
       protocol="TCP", extra_ports=()):
    """One EndpointSlice; `ready` maps address -> conditions.ready (absent: no conditions)."""
    ready = ready or {}
    eps = []
    for a in addresses:
        ep = {"addresses": [a]}
        if a in ready:
            ep["conditions"] = {"ready": ready[a]}
        eps.append(ep)
    return {
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "kubernetes"}},
        "addressType": family,
        "endpoints": eps,
        "ports": [*extra_ports, {"name": port_name, "port": port, "protocol": protocol}],
    }


def strs(specs) -> list[str]:
    return [str(s) for s in specs]


class ListLog:
    """An EventLog stand-in that keeps (level, event, fields)."""

    def __init__(self):
        self.records: list[tuple[str, str, dict]] = []

    def _add(self, level, event, fields):
        self.records.append((level, event, fields))

    def info(self, event, **f):
        self._add("info", event, f)

    def warn(self, event, **f):
        self._add("warn", event, f)

    def error(self, event, **f):
        self._add("error", event, f)

    def events(self, name: str) -> list[dict]:
        return [f for _lvl, ev, f in self.records if ev == name]

    def dump(self) -> str:
        return "\n".join(f"{lvl} {ev} {f}" for lvl, ev, f in self.records)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1/kubernetes and a client certificate."""
    import trustme

    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA(organization_name="discovery test")
    server = ca.issue_cert("127.0.0.1", "kubernetes")
    client = ca.issue_cert("client.invalid", common_name="system:node:test")
    out = {"dir": d, "ca": ca, "server": server, "client": client}
    ca.cert_pem.write_to_path(str(d / "ca.crt"))
    (d / "client.crt").write_bytes(b"".join(p.bytes() for p in client.cert_chain_pems))
    client.private_key_pem.write_to_path(str(d / "client.key"))
    return out


def write_kc(path: Path, cluster: dict, user: dict, *, context="ctx", current=True,
             extra_contexts=()) -> str:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://10.0.0.1:6443", **cluster}},
                     {"name": "other", "cluster": {"server": "https://10.9.9.9:6443",
                                                   "tls-server-name": "other.example"}}],
        "users": [{"name": "u", "user": user}, {"name": "u2", "user": {"token": "t2"}}],
        "contexts": [{"name": context, "context": {"cluster": "c", "user": "u"}},
                     {"name": "alt", "context": {"cluster": "other", "user": "u2"}},
                     *extra_contexts],
    }
    if current:
        doc["current-context"] = context
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def tls_handshake(client_ctx: ssl.SSLContext, server_cert, ca, server_name: str):
    """An in-memory TLS handshake (no sockets): returns the client certificate
    the server saw (or None)."""
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_cert.configure_cert(sctx)
    ca.configure_trust(sctx)
    sctx.verify_mode = ssl.CERT_OPTIONAL
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    cli = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_name)
    srv = sctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, obj, out_bio, peer_in in (("c", cli, c_out, s_in), ("s", srv, s_out, c_in)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            data = out_bio.read()
            if data:
                peer_in.write(data)
        if all(done.values()):
            break
    assert all(done.values()), "handshake did not finish"
    return srv.getpeercert()


# --------------------------------------------------------------------------------
# unit: slices -> endpoints
# --------------------------------------------------------------------------------


def test_slices_ready_conditions():
    sl = es(["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"],
            ready={"10.0.0.1": True, "10.0.0.2": False, "10.0.0.3": None})
    sl["endpoints"].append({"addresses": ["10.0.0.5"], "conditions": {"ready": False, "serving": True,
                                                                       "terminating": True}})
    sl["endpoints"].append({"addresses": ["10.0.0.6"], "conditions": {}})
    # ready true, null (unknown: counts as ready), absent conditions, empty conditions
    assert strs(endpoints_from_slices([sl])) == ["10.0.0.1:6443", "10.0.0.3:6443", "10.0.0.4:6443",
                                                 "10.0.0.6:6443"]


def test_slices_ports():
    # the port named https among others
    sl = es(["10.0.0.1"], 6443, extra_ports=[{"name": "metrics", "port": 9000, "protocol": "TCP"}])
    assert strs(endpoints_from_slices([sl])) == ["10.0.0.1:6443"]
    # no https port, a UDP https port, a port without a number, an out-of-range port: skipped
    assert endpoints_from_slices([es(["10.0.0.1"], port_name="http")]) == []
    assert endpoints_from_slices([es(["10.0.0.1"], protocol="UDP")]) == []
    bad = es(["10.0.0.1"])
    bad["ports"] = [{"name": "https"}]
    assert endpoints_from_slices([bad]) == []
    bad["ports"] = [{"name": "https", "port": 70000}]
    assert endpoints_from_slices([bad]) == []
    bad["ports"] = None
    assert endpoints_from_slices([bad]) == []
    # protocol omitted means TCP
    ok = es(["10.0.0.1"], 443)
    del ok["ports"][0]["protocol"]
    assert strs(endpoints_from_slices([ok])) == ["10.0.0.1:443"]
    # a custom port name
    assert strs(endpoints_from_slices([es(["10.0.0.1"], port_name="api")], port_name="api")) == \
        ["10.0.0.1:6443"]


def test_slices_ipv6_fqdn_and_junk():
    v6 = es(["2001:db8:0:0:0:0:0:1", "fd00::a"], family="IPv6", name="kubernetes-v6")
    fqdn = es(["api.example.com"], family="FQDN", name="fqdn")
    fqdn_with_ip = es(["10.0.0.9"], family="FQDN", name="fqdn2")  # FQDN slices are ignored whole
    mixed = es(["10.0.0.1", "fd00::b", "not-an-ip", "10.0.0.256"])  # wrong family / invalid: skipped
    junk = [None, "x", {"addressType": "IPv4"}, {"addressType": "IPv4", "endpoints": [None, {}],
                                                 "ports": [{"name": "https", "port": 1}]}]
    specs = endpoints_from_slices([v6, fqdn, fqdn_with_ip, mixed, *junk])
    assert strs(specs) == ["10.0.0.1:6443", "[2001:db8::1]:6443", "[fd00::a]:6443"]
    assert all(not s.is_name for s in specs)
    assert specs[1] == EndpointSpec("2001:db8::1", 6443)  # compressed form


def test_slice_addresses_no_connection_can_go_to_are_dropped():
    """The configuration's rules for an endpoint address apply to what a
    slice names: multicast, unspecified, reserved, link-local IPv6 and
    IPv4-mapped IPv6 are dropped, the rest kept."""
    v4 = es(["224.0.0.1", "0.0.0.0", "240.0.0.1", "255.255.255.255", "10.0.0.1"])
    v6 = es(["ff02::1", "::", "fe80::1", "::ffff:10.0.0.2", "fd00::1"], family="IPv6", name="kubernetes-v6")
    assert strs(endpoints_from_slices([v4, v6])) == ["10.0.0.1:6443", "[fd00::1]:6443"]


def test_slices_deduplicated_and_sorted():
    a = es(["10.0.0.10", "10.0.0.9", "10.0.0.10"], name="a")
    b = es(["10.0.0.9", "192.168.0.1"], name="b")
    c = es(["10.0.0.9"], 7443, name="c")  # same address, other port: another endpoint
    d = es(["fd00::1"], family="IPv6", name="d")
    specs = endpoints_from_slices([d, b, c, a])
    assert strs(specs) == ["10.0.0.9:6443", "10.0.0.9:7443", "10.0.0.10:6443", "192.168.0.1:6443",
                           "[fd00::1]:6443"]


def test_slice_with_multiple_addresses_per_endpoint():
    sl = es([])
    sl["endpoints"] = [{"addresses": ["10.0.0.2", "10.0.0.1"], "conditions": {"ready": True}}]
    assert strs(endpoints_from_slices([sl])) == ["10.0.0.1:6443", "10.0.0.2:6443"]


# --------------------------------------------------------------------------------
# unit: kubeconfig
# --------------------------------------------------------------------------------


def test_kubeconfig_files_relative_paths_and_cert(pki, tmp_path):
    d = pki["dir"]
    (tmp_path / "pki").mkdir()
    for f in ("ca.crt", "client.crt", "client.key"):
        (tmp_path / "pki" / f).write_bytes((d / f).read_bytes())
    kc = write_kc(tmp_path / "kubeconfig", {"certificate-authority": "pki/ca.crt"},
                  {"client-certificate": "pki/client.crt", "client-key": "pki/client.key"})
    creds = load_kubeconfig(kc)
    assert creds.context == "ctx" and creds.server == "https://10.0.0.1:6443"
    assert creds.ca_pem and "BEGIN CERTIFICATE" in creds.ca_pem
    assert creds.auth_kind == "client-certificate" and creds.authorization() is None
    assert creds.tls_server_name is None and not creds.warnings
    # The context verifies the server against the CA and presents the client certificate.
    peer = tls_handshake(creds.ssl_context(), pki["server"], pki["ca"], "127.0.0.1")
    cn = [v for rdn in peer["subject"] for k, v in rdn if k == "commonName"]
    assert cn == ["system:node:test"]
    with pytest.raises(ssl.SSLCertVerificationError):  # name checking is on
        tls_handshake(creds.ssl_context(), pki["server"], pki["ca"], "10.0.0.1")


def test_kubeconfig_inline_data(pki, tmp_path):
    d = pki["dir"]
    kc = write_kc(tmp_path / "kc", {"certificate-authority-data": b64((d / "ca.crt").read_bytes()),
                                    "tls-server-name": "kubernetes"},
                  {"client-certificate-data": b64((d / "client.crt").read_bytes()),
                   "client-key-data": b64((d / "client.key").read_bytes())})
    creds = load_kubeconfig(kc)
    assert creds.tls_server_name == "kubernetes"
    peer = tls_handshake(creds.ssl_context(), pki["server"], pki["ca"], "kubernetes")
    assert peer is not None
    # nothing was written next to the kubeconfig or in /tmp with the key
    assert sorted(os.listdir(tmp_path)) == ["kc"]


def test_kubeconfig_data_wins_over_file_with_a_warning(pki, tmp_path):
    d = pki["dir"]
    kc = write_kc(tmp_path / "kc", {"certificate-authority-data": b64((d / "ca.crt").read_bytes()),
                                    "certificate-authority": "/nonexistent/ca.crt"},
                  {"token": "abc"})
    creds = load_kubeconfig(kc)
    assert any("certificate-authority-data wins" in w for w in creds.warnings)


def test_kubeconfig_token_tokenfile_basic(tmp_path):
    kc = write_kc(tmp_path / "kc", {"insecure-skip-tls-verify": True}, {"token": "static"})
    creds = load_kubeconfig(kc)
    assert creds.authorization() == "Bearer static" and creds.insecure_skip_tls_verify
    ctx = creds.ssl_context()
    assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname
    # tokenFile (relative) is re-read on each call, and wins over token while readable
    (tmp_path / "tok").write_text("one\n")
    kc = write_kc(tmp_path / "kc2", {}, {"tokenFile": "tok", "token": "fallback"})
    creds = load_kubeconfig(kc)
    assert creds.auth_kind == "token-file"
    assert creds.authorization() == "Bearer one"
    (tmp_path / "tok").write_text("two")
    assert creds.authorization() == "Bearer two"
    (tmp_path / "tok").unlink()
    assert creds.authorization() == "Bearer fallback"
    # a token file alone that cannot be read is an error
    kc = write_kc(tmp_path / "kc3", {}, {"tokenFile": str(tmp_path / "missing")})
    with pytest.raises(KubeconfigError, match="tokenFile"):
        load_kubeconfig(kc)
    kc = write_kc(tmp_path / "kc4", {}, {"username": "admin", "password": "s3cret"})
    assert load_kubeconfig(kc).authorization() == "Basic " + b64(b"admin:s3cret")


def test_kubeconfig_context_selection(tmp_path):
    kc = write_kc(tmp_path / "kc", {}, {"token": "a"}, current=False)
    with pytest.raises(KubeconfigError, match="no current-context"):
        load_kubeconfig(kc)
    creds = load_kubeconfig(kc, context="alt")
    assert creds.context == "alt" and creds.tls_server_name == "other.example"
    assert creds.authorization() == "Bearer t2"
    with pytest.raises(KubeconfigError, match="no context named 'nope'"):
        load_kubeconfig(kc, context="nope")
    kc = write_kc(tmp_path / "kc2", {}, {"token": "a"}, context="broken", extra_contexts=[
        {"name": "dangling", "context": {"cluster": "gone", "user": "u"}}])
    with pytest.raises(KubeconfigError, match="no cluster named 'gone'"):
        load_kubeconfig(kc, context="dangling")


def test_kubeconfig_errors(pki, tmp_path):
    with pytest.raises(KubeconfigError, match="No such file"):
        load_kubeconfig(tmp_path / "missing")
    (tmp_path / "bad").write_text("{not: [yaml")
    with pytest.raises(KubeconfigError, match="not valid YAML"):
        load_kubeconfig(tmp_path / "bad")
    (tmp_path / "list").write_text("- a\n- b\n")
    with pytest.raises(KubeconfigError, match="not a kubeconfig"):
        load_kubeconfig(tmp_path / "list")
    kc = write_kc(tmp_path / "exec", {}, {"exec": {"command": "aws", "apiVersion": "client.authentication.k8s.io/v1"}})
    with pytest.raises(KubeconfigError, match="'exec'"):
        load_kubeconfig(kc)
    kc = write_kc(tmp_path / "half", {}, {"client-certificate": str(pki["dir"] / "client.crt")})
    with pytest.raises(KubeconfigError, match="without a key"):
        load_kubeconfig(kc)
    kc = write_kc(tmp_path / "wrongkey", {}, {"client-certificate": str(pki["dir"] / "client.crt"),
                                              "client-key": str(pki["dir"] / "ca.crt")})
    with pytest.raises(KubeconfigError, match="do not load"):
        load_kubeconfig(kc)
    kc = write_kc(tmp_path / "noca", {"certificate-authority": "missing-ca.crt"}, {"token": "x"})
    with pytest.raises(KubeconfigError, match="missing-ca.crt"):
        load_kubeconfig(kc)


def test_watcher_rejects_non_https_server(tmp_path):
    with pytest.raises(ValueError):
        EndpointSliceWatcher(tmp_path / "kc", "http://127.0.0.1:7445")


# --------------------------------------------------------------------------------
# unit: cache, backoff, socket options
# --------------------------------------------------------------------------------


def test_cache_roundtrip_and_unusable_files(tmp_path):
    log = ListLog()
    cache = tmp_path / "sub" / "discovered.json"
    w = EndpointSliceWatcher(tmp_path / "kc", "https://127.0.0.1:7445", cache_file=cache, log=log)
    assert w.load_cached() == []  # no file yet
    specs = [EndpointSpec("10.0.0.1", 6443), EndpointSpec("fd00::1", 6443)]
    w._save_cache(specs)
    doc = json.loads(cache.read_text())
    assert doc["endpoints"] == ["10.0.0.1:6443", "[fd00::1]:6443"]
    assert doc["service"] == "kubernetes" and doc["namespace"] == "default"
    assert [p.name for p in cache.parent.iterdir()] == ["discovered.json"]  # no temp file left
    w2 = EndpointSliceWatcher(tmp_path / "kc", "https://127.0.0.1:7445", cache_file=cache, log=log)
    assert w2.load_cached() == specs and w2.endpoints == specs
    assert w2.status()["source"] == "cache"
    # another service's cache, names, garbage, another schema: ignored with a warning
    other = EndpointSliceWatcher(tmp_path / "kc", "https://127.0.0.1:7445", service="other",
                                 cache_file=cache, log=log)
    assert other.load_cached() == []
    for content in ('{"schema": 1, "namespace": "default", "service": "kubernetes", '
                    '"endpoints": ["api.example.com:6443"]}',
                    "not json", '{"schema": 99}', "[]",
                    '{"schema": 1, "namespace": "default", "service": "kubernetes", '
                    '"endpoints": ["10.0.0.1"]}'):
        cache.write_text(content)
        assert EndpointSliceWatcher(tmp_path / "kc", "https://127.0.0.1:7445", cache_file=cache,
                                    log=log).load_cached() == []
    assert len(log.events("discovery_cache_unusable")) == 6


def _cache_doc(endpoints, **kw) -> str:
    return json.dumps({"schema": 1, "namespace": "default", "service": "kubernetes",
                       "endpoints": endpoints, **kw})


@pytest.mark.parametrize("content,why", [
    ("[" * 30_000 + "]" * 30_000, "nested too deeply"),
    (_cache_doc(["10.0.0.1:6443"], pad="x" * 70_000), "larger than 64 KiB"),
    (_cache_doc([f"198.18.{i // 200}.{i % 200 + 1}:6443" for i in range(129)]), "129 endpoints"),
    (_cache_doc([f"198.18.{i // 200}.{i % 200 + 1}:6443" for i in range(65)]), "more than 64 IPv4"),
    (_cache_doc("10.0.0.1:6443"), "not a list of strings"),
    (_cache_doc([6443]), "not a list of strings"),
    (_cache_doc([["10.0.0.1:6443"]]), "not a list of strings"),
    (_cache_doc(["224.0.0.1:6443"]), "not a unicast address"),
    (_cache_doc(["0.0.0.0:6443"]), "not a unicast address"),
    (_cache_doc(["[fe80::1]:6443"]), "link-local"),
    (_cache_doc(["10.0.0.1:70000"]), "out of range"),
    (json.dumps({"schema": True, "namespace": "default", "service": "kubernetes", "endpoints": []}), "schema"),
    (json.dumps({"schema": 1, "namespace": ["default"], "service": "kubernetes", "endpoints": []}), "it is for"),
    (b"\xff\xfe{}", "not JSON"),
    ('"just a string"', "not a JSON object"),
])
def test_a_hostile_cache_file_is_ignored_with_a_warning(tmp_path, content, why):
    """Whatever the cache file holds, the watcher starts without it and says
    why; never an exception, never more than the data paths hold."""
    cache = tmp_path / "discovered.json"
    cache.write_bytes(content if isinstance(content, bytes) else content.encode())
    log = ListLog()
    w = EndpointSliceWatcher(tmp_path / "kc", "https://127.0.0.1:7445", cache_file=cache, log=log)
    assert w.load_cached() == [] and w.endpoints == [] and w.status()["source"] == "none"
    (warning,) = log.events("discovery_cache_unusable")
    assert why in warning["error"], warning


def test_the_cache_holds_what_the_limits_allow(tmp_path):
    """The largest cache the limits allow, 64 addresses per family, loads;
    a directory in its place is ignored."""
    cache = tmp_path / "discovered.json"
    full = [f"198.18.0.{i + 1}:6443" for i in range(64)] + [f"[2001:2::{i + 1:x}]:6443" for i in range(64)]
    cache.write_text(_cache_doc(full, updated_at=["not", "a", "time"]))
    log = ListLog()
    w = EndpointSliceWatcher(tmp_path / "kc", "https://127.0.0.1:7445", cache_file=cache, log=log)
    assert len(w.load_cached()) == 128 and log.events("discovery_cache_loaded")[0]["saved_at"] is None
    d = tmp_path / "dir"
    d.mkdir()
    w = EndpointSliceWatcher(tmp_path / "kc", "https://127.0.0.1:7445", cache_file=d, log=log)
    assert w.load_cached() == [] and "not a regular file" in log.events("discovery_cache_unusable")[0]["error"]


@pytest.mark.parametrize("name,content,problem", [
    ("deep", "clusters: " + "[" * 10_000 + "]" * 10_000 + "\n", "nested deeper than 16 levels"),
    ("huge", "# " + "x" * (1024 * 1024) + "\n", "larger than 1024 KiB"),
    ("bomb", "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
             "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n",
     "more than 1024 values"),
    ("twice", "current-context: a\ncurrent-context: b\n", "given twice"),
    ("tag", "current-context: !!python/object:os.system x\n", "not valid YAML"),
    ("binary", None, "not UTF-8"),
    ("list", "- a\n- b\n", "top level is not a mapping"),
    ("contexts", "current-context: c\ncontexts: 5\n", "no context named 'c'"),
])
def test_a_hostile_kubeconfig_is_a_named_error(tmp_path, name, content, problem):
    """A kubeconfig is parsed by the bounded YAML reader: a document nested
    10,000 deep, a huge one, an alias bomb, a key given twice, a tag:
    a KubeconfigError naming the file, never a traceback; and the same
    through the configuration (exit 2, the field named)."""
    from prism_kernel.config import build_config
    from prism_kernel.errors import ConfigError

    path = tmp_path / f"{name}.conf"
    if content is None:
        path.write_bytes(b"current-context: \xff\xfe\n")
    else:
        path.write_text(content)
    with pytest.raises(KubeconfigError) as e:
        load_kubeconfig(path)
    assert str(path) in str(e.value) and problem in str(e.value), e.value
    with pytest.raises(ConfigError) as e:
        build_config({"endpoints": ["198.18.1.2:6443"], "probe": {"mode": "tls", "ca_file": str(pki_ca(tmp_path))},
                      "discovery": {"enabled": True, "kubeconfig": str(path)}}, {})
    (only,) = e.value.problems
    assert only.startswith("discovery") and str(path) in only and problem in only, only


@pytest.mark.parametrize("cluster,user,problem", [
    ({"tls-server-name": ["kubernetes"]}, {"token": "t"}, "tls-server-name must be a string"),
    ({"insecure-skip-tls-verify": "yes"}, {"token": "t"}, "insecure-skip-tls-verify must be true or false"),
    ({}, {"token": {"a": 1}}, "token must be a string"),
    ({}, {"tokenFile": 7}, "tokenFile must be a string"),
    ({}, {"client-certificate": "a\x00b", "client-key": "k"}, "client certificate"),
])
def test_kubeconfig_values_of_the_wrong_type(tmp_path, cluster, user, problem):
    kc = write_kc(tmp_path / "kc", cluster, user)
    with pytest.raises(KubeconfigError, match=problem):
        load_kubeconfig(kc)


def pki_ca(tmp_path: Path) -> Path:
    """A CA file the probe settings accept."""
    import trustme

    p = tmp_path / "ca.crt"
    if not p.exists():
        trustme.CA().cert_pem.write_to_path(str(p))
    return p


def test_atomic_write_replaces(tmp_path):
    p = tmp_path / "f.json"
    atomic_write(p, b"one")
    atomic_write(p, b"two")
    assert p.read_bytes() == b"two" and os.listdir(tmp_path) == ["f.json"]
    assert (p.stat().st_mode & 0o777) == 0o644


def test_backoff_capped_with_jitter():
    b = Backoff(0.5, 30.0)
    delays = [b.next() for _ in range(40)]
    assert 0.25 <= delays[0] <= 0.5
    assert all(d <= 30.0 for d in delays) and max(delays) >= 15.0
    assert len({round(d, 6) for d in delays[-10:]}) > 1  # jittered at the cap
    b.reset()
    assert b.next() <= 0.5


def test_tcp_keepalive_options():
    with socket.socket() as s:
        tune_socket(s)
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 60000


def test_watch_events_applied():
    """ADDED/MODIFIED/DELETED/BOOKMARK/ERROR as a watch delivers them."""
    log = ListLog()
    st = SliceStore("kubernetes", log)
    s1 = es(["10.0.0.1"])
    s1["metadata"]["resourceVersion"] = "5"
    assert st.apply({"type": "ADDED", "object": s1}) and st.resource_version == "5"
    s1b = es(["10.0.0.2"])
    s1b["metadata"]["resourceVersion"] = "6"
    assert st.apply({"type": "MODIFIED", "object": s1b})
    assert strs(st.endpoints()) == ["10.0.0.2:6443"] and st.events == 2
    assert not st.apply({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}})
    assert st.resource_version == "9" and st.bookmarks == 1 and st.events == 2
    unlabeled = es(["10.0.0.3"])
    unlabeled["metadata"]["labels"] = {"kubernetes.io/service-name": "other"}
    assert st.apply({"type": "MODIFIED", "object": unlabeled})  # left the selector: dropped
    assert st.slices == {}
    assert not st.apply({"type": "DELETED", "object": s1})  # already gone
    with pytest.raises(Gone):
        st.apply({"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}})
    with pytest.raises(ApiError, match="500") as e:
        st.apply({"type": "ERROR", "object": {"kind": "Status", "code": 500, "message": "boom"}})
    assert not isinstance(e.value, Gone)
    with pytest.raises(ApiError):
        st.apply({"type": "ADDED"})
    with pytest.raises(ApiError):
        st.apply(["not", "an", "object"])
    assert not st.apply({"type": "WHATEVER", "object": {}})
    assert log.events("discovery_unknown_event") == [{"type": "WHATEVER"}]
    # a list replaces everything, non-objects among its items skipped
    st.replace([es(["10.0.0.7"]), "junk"], "42")
    assert strs(st.endpoints()) == ["10.0.0.7:6443"] and st.resource_version == "42"


def _rv(sl: dict, rv: str) -> dict:
    sl["metadata"]["resourceVersion"] = rv
    return sl


def _injected() -> dict[str, dict]:
    """Slices someone allowed to create EndpointSlices in `default` could add
    next to kube-apiserver's own, each naming 198.18.66.6."""
    managed = es(["198.18.66.6"], name="kubernetes-x7k2p")
    managed["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] = "endpointslice-controller.k8s.io"
    managed_v6 = es(["2001:2:0:66::6"], family="IPv6", name="kubernetes-v6")
    managed_v6["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] = "kube-apiserver"
    return {
        "other name": es(["198.18.66.6"], name="kubernetes-extra"),
        "managed-by": managed,
        "managed-by on a secondary name": managed_v6,
        "wrong addressType": es(["2001:2:0:66::6"], family="IPv6", name="kubernetes-v4"),
        "another namespace": {**es(["198.18.66.6"]), "metadata": {
            "name": "kubernetes", "namespace": "kube-system",
            "labels": {"kubernetes.io/service-name": "kubernetes"}}},
    }


def test_only_kube_apiservers_own_slices_name_endpoints():
    """A list (the fake list) with kube-apiserver's slice and injected ones:
    only the real one's addresses are reported; each injected slice is
    logged once, with why, and again only when its resourceVersion moves."""
    log = ListLog()
    st = SliceStore("kubernetes", log)
    injected = _injected()
    real = _rv(es(["10.0.0.1", "10.0.0.2"]), "100")
    items = [real] + [_rv(sl, str(101 + i)) for i, sl in enumerate(injected.values())]
    st.replace(items, "200")
    assert strs(st.endpoints()) == ["10.0.0.1:6443", "10.0.0.2:6443"]
    ignored = log.events("discovery_slice_ignored")
    assert len(ignored) == len(injected) == st.ignored
    by_name = {(e["namespace"], e["name"]): e for e in ignored}
    assert "name 'kubernetes-extra'" in by_name["default", "kubernetes-extra"]["reason"]
    assert by_name["default", "kubernetes-x7k2p"]["managed_by"] == "endpointslice-controller.k8s.io"
    assert "managed-by" in by_name["default", "kubernetes-v6"]["reason"]
    assert "addressType 'IPv6' in a slice named 'kubernetes-v4'" in by_name["default", "kubernetes-v4"]["reason"]
    assert by_name["kube-system", "kubernetes"]["reason"].startswith("namespace 'kube-system'")
    assert all(e["addresses"] in ("198.18.66.6:6443", "[2001:2:0:66::6]:6443") for e in ignored)
    # reported again (another slice changed): nothing new is logged
    assert strs(st.endpoints()) == ["10.0.0.1:6443", "10.0.0.2:6443"]
    assert len(log.events("discovery_slice_ignored")) == len(injected)
    # a watch event (the fake watch) for one injected slice: logged once more
    sl = _rv(es(["198.18.66.7"], name="kubernetes-extra"), "300")
    assert st.apply({"type": "MODIFIED", "object": sl})
    assert strs(st.endpoints()) == ["10.0.0.1:6443", "10.0.0.2:6443"]
    again = log.events("discovery_slice_ignored")[len(injected):]
    assert [(e["name"], e["resource_version"]) for e in again] == [("kubernetes-extra", "300")]
    # the wrong addressType in the primary name
    st.apply({"type": "MODIFIED", "object": _rv(es(["api.example.com"], family="FQDN"), "301")})
    assert st.endpoints() == []
    assert "addressType 'FQDN'" in log.events("discovery_slice_ignored")[-1]["reason"]


def test_the_real_slice_is_used_dual_stack_too():
    """kube-apiserver's slices: `kubernetes` of the primary family (IPv4 or
    IPv6) and, on a dual-stack control plane, `kubernetes-v6`/`-v4` of the
    other; a secondary slice alone (no primary) is not believed."""
    for primary, secondary in ((es(["10.0.0.1"]), es(["fd00::1"], family="IPv6", name="kubernetes-v6")),
                               (es(["fd00::1"], family="IPv6"), es(["10.0.0.1"], name="kubernetes-v4"))):
        log = ListLog()
        st = SliceStore("kubernetes", log)
        st.replace([primary, secondary], "7")
        assert strs(st.endpoints()) == ["10.0.0.1:6443", "[fd00::1]:6443"], log.dump()
        assert st.ignored == 0 and not log.events("discovery_slice_ignored")
        assert st.apply({"type": "DELETED", "object": primary})
        assert st.endpoints() == [] and st.ignored == 1
        assert "without kube-apiserver's primary slice 'kubernetes'" in \
            log.events("discovery_slice_ignored")[0]["reason"]
    # a secondary name of the primary family (the name is free on a single-stack cluster)
    log = ListLog()
    st = SliceStore("kubernetes", log)
    st.replace([es(["10.0.0.1"]), es(["198.18.66.6"], name="kubernetes-v4")], "8")
    assert strs(st.endpoints()) == ["10.0.0.1:6443"]
    assert "of the primary family IPv4" in log.events("discovery_slice_ignored")[0]["reason"]
    # another Service (discovery.service) and namespace: the same rule by its name
    st = SliceStore("api", ListLog(), "infra")
    sl = es(["10.0.0.9"], name="api")
    sl["metadata"].update(namespace="infra", labels={"kubernetes.io/service-name": "api"})
    st.replace([sl], "1")
    assert strs(st.endpoints()) == ["10.0.0.9:6443"]


def test_no_trusted_slice_keeps_the_last_list(tmp_path):
    """Only injected slices (the real one deleted): nothing is reported, the
    last list stays (and the static endpoints, which discovery never
    touches); status says how many slices were ignored."""
    kc = write_kc(tmp_path / "kc", {"insecure-skip-tls-verify": True}, {"token": "t"})
    log = ListLog()
    w = EndpointSliceWatcher(kc, "https://127.0.0.1:17445", log=log)
    reports = []
    w.store.replace([_rv(es(["10.0.0.1"]), "1"), _rv(es(["198.18.66.6"], name="kubernetes-extra"), "2")], "2")
    asyncio.run(w._report(reports.append))
    assert [strs(r) for r in reports] == [["10.0.0.1:6443"]]
    w.store.apply({"type": "DELETED", "object": _rv(es(["10.0.0.1"]), "3")})
    asyncio.run(w._report(reports.append))
    assert len(reports) == 1 and strs(w.endpoints) == ["10.0.0.1:6443"]
    assert log.events("discovery_empty")[0]["ignored"] == 1
    assert w.status()["ignored_slices"] == 1


@pytest.mark.parametrize("probe,named", [
    ({"mode": "tcp"}, "probe.mode 'tcp' (--probe)"),
    ({"mode": "readyz", "insecure_skip_verify": True}, "probe.insecure_skip_verify (--insecure-skip-verify)"),
    ({"mode": "tls", "insecure_skip_verify": True}, "probe.insecure_skip_verify (--insecure-skip-verify)"),
])
def test_discovery_needs_probes_that_verify_the_certificate(pki, tmp_path, probe, named):
    """A discovered address is only kept out of the set by a probe that
    verifies the API server certificate: discovery with tcp probes, or with
    verification off, is a configuration error naming both fields."""
    from prism_kernel.config import build_config
    from prism_kernel.errors import ConfigError

    data = {"endpoints": ["198.18.1.2:6443"], "probe": probe,
            "discovery": {"enabled": True, "kubeconfig": str(tmp_path / "not-yet.conf")}}
    with pytest.raises(ConfigError) as e:
        build_config(data, {})
    assert len(e.value.problems) == 1, e.value.problems
    assert "discovery.enabled (--discovery)" in e.value.problems[0] and named in e.value.problems[0]
    # the same by flags
    with pytest.raises(ConfigError, match="discovery.enabled"):
        build_config({"endpoints": ["198.18.1.2:6443"], "discovery": {"kubeconfig": str(tmp_path / "k")}},
                     {"discovery": {"enabled": True}, "probe": {"mode": "tcp"}})
    # verified probes, or discovery off: valid
    ca = str(pki["dir"] / "ca.crt")
    for mode in ("tls", "readyz"):
        ok = build_config({**data, "probe": {"mode": mode, "ca_file": ca}}, {})
        assert ok.discovery.enabled and ok.probe.mode == mode
    assert not build_config({**data, "discovery": {"enabled": False}}, {}).discovery.enabled


def _events(n: int) -> list[dict]:
    out = []
    for i in range(n):
        sl = es([f"10.0.{i // 250}.{i % 250 + 1}"], name=f"s{i}")
        sl["metadata"]["annotations"] = {"quote": 'a "quoted" {brace} [bracket] \\ back\\slash', "u": "é☃"}
        out.append({"type": "ADDED", "object": sl})
    return out


@pytest.mark.parametrize("sep", [b"\n", b"", b" \r\n\t"])
def test_watch_stream_framing_whatever_the_pieces(sep):
    """Events split anywhere (inside strings, escapes, multi-byte UTF-8),
    concatenated with or without whitespace: each comes out once, whole."""
    import random as _random

    evs = _events(40)
    data = sep.join(json.dumps(e, ensure_ascii=False).encode() for e in evs) + sep
    rng = _random.Random(7)
    for _ in range(30):
        js, got, pos = JsonObjectStream(MAX_EVENT_BYTES), [], 0
        while pos < len(data):
            n = rng.choice([1, 2, 3, 7, 64, 1000])
            got += js.feed(data[pos:pos + n])
            pos += n
        assert got == evs
    assert JsonObjectStream(MAX_EVENT_BYTES).feed(data) == evs  # all at once


def test_watch_stream_framing_rejects_what_is_not_an_event_stream():
    for bad in (b"[1, 2]", b"42", b'"s"', b"{} x", b'{"a": 1]', b'{"a": "\xff"}'):
        with pytest.raises(ValueError):
            JsonObjectStream(1000).feed(bad)
    # an object over the limit fails once the bytes held pass it, before it ends
    js = JsonObjectStream(1000)
    js.feed(b'{"a": "' + b"x" * 900)
    with pytest.raises(ValueError, match="larger than 1000"):
        js.feed(b"x" * 200)
    # the limit is per object: many small ones in one piece are fine
    assert len(JsonObjectStream(1000).feed(b'{"a": 1}' * 500)) == 500


@pytest.mark.timing
def test_watch_stream_framing_is_linear():
    """A server that cuts one large event into 64-byte pieces costs about what
    it costs whole. A framing that parses the whole buffer again for every
    piece (as json.JSONDecoder.raw_decode on the buffer would) is quadratic:
    about 2,000 parses of 60 kB on average here, seconds instead of
    milliseconds."""
    one = json.dumps({"type": "ADDED", "object": es(["10.0.0.1"] * 4500)}).encode()
    assert 120_000 < len(one) < MAX_EVENT_BYTES
    js, got = JsonObjectStream(MAX_EVENT_BYTES), []
    t0 = time.perf_counter()
    for i in range(0, len(one), 64):
        got += js.feed(one[i:i + 64])
    took = time.perf_counter() - t0
    assert len(got) == 1 and took < 0.5, took


# --------------------------------------------------------------------------------
# integration: the watcher against the fake API servers
# --------------------------------------------------------------------------------

needs_root = pytest.mark.kernel  # the testbed: hosts in network namespaces (root)


@pytest.fixture(scope="module")
def _clear():
    if os.geteuid() != 0:
        pytest.skip("the testbed needs root")
    from tests.testbed import clear_stale

    clear_stale(PREFIX)
    yield
    clear_stale(PREFIX)


@pytest.fixture
def tb(_clear):
    from tests.testbed import Testbed

    with Testbed(n_backends=3, prefix=PREFIX, net_offset=NET_OFFSET) as t:
        yield t
        # the fake servers must not have failed behind the test's back
        for srv in t.servers:
            text = Path(srv.log_file).read_text(errors="replace") if Path(srv.log_file).exists() else ""
            assert "Traceback" not in text, f"{srv.name}:\n{text[-3000:]}"


def addrs(tb, *idx) -> list[str]:
    return [tb.backends[i].address for i in idx]


def eps(tb, *idx, port=6443) -> list[str]:
    return [f"{a}:{port}" for a in addrs(tb, *idx)]


class Run:
    """A watcher running in a task; reports recorded with their time."""

    def __init__(self, watcher: EndpointSliceWatcher):
        self.w = watcher
        self.reports: list[tuple[float, list[str]]] = []
        self.task: asyncio.Task | None = None

    def on_change(self, specs):
        self.reports.append((time.monotonic(), strs(specs)))

    async def until(self, cond, timeout: float, what: str = "condition") -> float:
        """Wait (bounded) for cond(); returns the seconds it took."""
        t0 = time.monotonic()
        while not cond():
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"{what} not met within {timeout}s; reports={self.reports}\n"
                                     f"status={self.w.status()}\nlog:\n{self.w.log.dump()}")
            if self.task is not None and self.task.done():
                self.task.result()
                raise AssertionError("the watcher stopped")
            await asyncio.sleep(0.01)
        return time.monotonic() - t0

    async def report(self, expected: list[str], timeout: float = 1.0) -> float:
        return await self.until(lambda: self.reports and self.reports[-1][1] == expected, timeout,
                                f"report {expected}")

    async def seen(self, rv: int, timeout: float = 1.0) -> float:
        """Wait until the watcher has applied the events up to resourceVersion
        `rv` (what tb.set_endpointslices returned): after that, what it did
        not report it never will for them."""
        return await self.until(lambda: self.w.resource_version == str(rv), timeout, f"resourceVersion {rv}")


def run_watcher(tb, scenario, *, server=None, kubeconfig=None, cache=True, **kw):
    """Run `scenario(run)` with a watcher against `server` (default be0); the
    watcher task is always cancelled and awaited."""
    server = server or tb.backends[0].url
    kubeconfig = kubeconfig or tb.write_kubeconfig(server="https://203.0.113.1:6443")
    kw.setdefault("backoff_initial", 0.05)
    kw.setdefault("backoff_max", 0.3)
    kw.setdefault("log", ListLog())
    cache_file = kw.pop("cache_file", Path(tb.tmpdir) / "discovered.json" if cache else None)
    preload = kw.pop("preload", False)
    w = EndpointSliceWatcher(kubeconfig, server, cache_file=cache_file, **kw)

    async def main():
        r = Run(w)
        if preload:
            w.load_cached()
        r.task = asyncio.create_task(w.run(r.on_change))
        try:
            return await asyncio.wait_for(scenario(r), 60)
        finally:
            r.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await r.task
            assert w.api.conn is None

    return asyncio.run(main())


def switch(*args, **kw):
    """A blocking testbed call from the event loop (the loop keeps running)."""
    fn, *rest = args
    return asyncio.to_thread(fn, *rest, **kw)


@needs_root
def test_initial_list_then_changes_through_the_watch(tb):
    be = tb.backends[0]

    async def scenario(r: Run):
        await r.report(eps(tb, 0, 1, 2), timeout=3)
        assert len(r.reports) == 1
        # a control-plane node joins
        t0 = time.monotonic()
        await switch(tb.set_endpointslices, addrs(tb, 0, 1, 2) + ["198.18.99.7"])
        await r.report(sorted(eps(tb, 0, 1, 2) + ["198.18.99.7:6443"]))
        joined = time.monotonic() - t0
        # one leaves
        t0 = time.monotonic()
        await switch(tb.set_endpointslices, addrs(tb, 0, 2))
        await r.report(eps(tb, 0, 2))
        left = time.monotonic() - t0
        # one becomes not ready (the apiserver's reconciler), and another port
        await switch(tb.set_endpointslices, addrs(tb, 0, 2), not_ready=addrs(tb, 2))
        await r.report(eps(tb, 0))
        await switch(tb.set_endpointslices, addrs(tb, 0, 1), 7443)
        await r.report(eps(tb, 0, 1, port=7443))
        return joined, left

    joined, left = run_watcher(tb, scenario)
    assert joined < 1.0 and left < 1.0, (joined, left)
    st = tb.endpointslice_stats(be)
    assert st["lists"] == 1, st  # every change came through the one watch
    assert st["watches"] >= 1 and st["last_user_agent"].startswith("prism-kernel/")
    q = st["last_query"]
    assert q["labelSelector"] == SELECTOR and q["allowWatchBookmarks"] == "true"
    assert q["watch"] == "1" and int(q["timeoutSeconds"]) >= 300 and int(q["resourceVersion"]) > 1000
    assert st["last_auth"] == "bearer"


@needs_root
def test_empty_list_is_never_reported(tb):
    cache = Path(tb.tmpdir) / "discovered.json"

    async def scenario(r: Run):
        await r.report(eps(tb, 0, 1, 2), timeout=3)
        saved = cache.read_text()
        await r.seen(await switch(tb.set_endpointslices, []))
        assert len(r.reports) == 1 and strs(r.w.endpoints) == eps(tb, 0, 1, 2)
        assert not r.w.store.endpoints()  # it did see the empty slice
        # all not ready is empty too; a deleted slice as well
        await r.seen(await switch(tb.set_endpointslices, addrs(tb, 0), not_ready=addrs(tb, 0)))
        assert r.w.store.slices and not r.w.store.endpoints()
        await r.seen(await switch(tb.set_endpointslices, slices=[]))
        assert not r.w.store.slices
        assert len(r.reports) == 1 and cache.read_text() == saved
        empties = r.w.log.events("discovery_empty")
        assert len(empties) == 1 and empties[0]["keeping"] == ",".join(eps(tb, 0, 1, 2))
        # back: reported
        await switch(tb.set_endpointslices, addrs(tb, 1))
        await r.report(eps(tb, 1))
        # a relist that finds nothing keeps the list as well
        await switch(tb.set_endpointslices, [])
        lists = r.w.lists
        await switch(tb.expire_endpointslice_watches)
        # the relist done and reported on (a list reports before the watch starts)
        await r.until(lambda: r.w.lists == lists + 1 and r.w.state == "watching", 2, "relist")
        assert r.w.relists_gone == 1 and r.w.store.slices and not r.w.store.endpoints()
        assert r.reports[-1][1] == eps(tb, 1) and strs(r.w.endpoints) == eps(tb, 1)

    run_watcher(tb, scenario)


@needs_root
def test_relist_after_410_gone(tb):
    be = tb.backends[0]

    async def scenario(r: Run):
        await r.report(eps(tb, 0, 1, 2), timeout=3)
        await r.until(lambda: r.w.state == "watching", 1)
        # the watch cache moved on: the open watch gets ERROR 410 and a watch
        # from the old resourceVersion would get it too -> relist
        n = await switch(tb.expire_endpointslice_watches)
        assert n == 1
        await r.until(lambda: r.w.lists == 2, 1, "relist")
        assert r.w.relists_gone == 1 and len(r.reports) == 1  # same list: nothing to report
        await switch(tb.set_endpointslices, addrs(tb, 1))
        await r.report(eps(tb, 1))
        # a change while the history is compacted and no watch open: the resumed
        # watch gets 410, the relist finds the change
        await switch(tb.expire_endpointslice_watches)
        await switch(tb.set_endpointslices, addrs(tb, 2))
        await r.report(eps(tb, 2))

    run_watcher(tb, scenario)
    st = tb.endpointslice_stats(be)
    assert st["lists"] >= 3 and st["gone"] >= 2, st


@needs_root
def test_reconnect_after_the_server_is_stopped_and_started(tb):
    be = tb.backends[0]

    async def scenario(r: Run):
        await r.report(eps(tb, 0, 1, 2), timeout=3)
        await switch(be.stop)
        await r.until(lambda: r.w.errors >= 3, 2, "failed reconnects")
        # the cluster changes while this server is down: more failed attempts
        # after the change, nothing reported
        await switch(tb.set_endpointslices, addrs(tb, 1, 2))
        failed = r.w.errors
        await r.until(lambda: r.w.errors >= failed + 2, 2, "failed reconnects after the change")
        assert len(r.reports) == 1
        errors = r.w.errors
        await switch(be.start)
        took = await r.report(eps(tb, 1, 2), timeout=2)
        # the restarted server has no history: 410 for the old resourceVersion, relist
        assert r.w.relists_gone >= 1
        await switch(tb.set_endpointslices, addrs(tb, 0))
        await r.report(eps(tb, 0))
        return took, errors

    took, errors = run_watcher(tb, scenario, backoff_max=0.3)
    assert took < 1.5
    # backoff was capped: 0.5 s at 0.05..0.3 s per attempt
    assert 3 <= errors <= 40


@needs_root
def test_freeze_is_noticed_by_the_watch_timeout(tb):
    """A server that stops answering (SIGSTOP: TCP still up) is left after the
    watch's timeoutSeconds plus a grace; the watcher then reaches another one
    (here the same one, thawed)."""
    be = tb.backends[0]

    async def scenario(r: Run):
        await r.report(eps(tb, 0, 1, 2), timeout=3)
        await switch(be.freeze)
        await switch(tb.set_endpointslices, addrs(tb, 1))
        # Frozen past the watch's timeoutSeconds (1 s) but within its grace
        # (5 s): the watcher must ride it out. The length of the freeze is the
        # scenario's condition, not a wait for anything.
        await asyncio.sleep(2.0)
        await switch(be.thaw)  # the thawed server sends the change
        await r.report(eps(tb, 1), timeout=2)
        assert r.w.errors == 0 and r.w.lists == 1, r.w.status()  # no reconnect, no relist
        await switch(be.freeze)
        await r.until(lambda: r.w.errors >= 1, 12, "stalled watch dropped")
        await switch(be.thaw)
        await switch(tb.set_endpointslices, addrs(tb, 2))
        await r.report(eps(tb, 2), timeout=3)

    # watch_timeout 1 s: timeoutSeconds 1 s, deadline 1 + 5 s grace
    run_watcher(tb, scenario, watch_timeout=1, connect_timeout=1, request_timeout=1)


@needs_root
def test_watch_renewed_on_one_connection_with_bookmarks(tb):
    be = tb.backends[0]
    tb.set_watch_bookmarks(0.2)

    async def scenario(r: Run):
        await r.report(eps(tb, 0, 1, 2), timeout=3)
        await r.until(lambda: r.w.watches >= 3, 5, "renewed watches")
        await switch(tb.set_endpointslices, addrs(tb, 0))
        await r.report(eps(tb, 0))

    be.reset_stats()
    run_watcher(tb, scenario, watch_timeout=1)
    st = be.stats()
    assert st["endpointslices"]["lists"] == 1, st
    assert st["endpointslices"]["bookmarks_sent"] >= 3
    assert st["connections"] == 1, st  # the watch is renewed on the kept-alive connection


@needs_root
def test_cache_written_and_loaded(tb):
    be = tb.backends[0]
    cache = Path(tb.tmpdir) / "cache" / "discovered.json"

    async def first(r: Run):
        await r.report(eps(tb, 0, 1, 2), timeout=3)

    run_watcher(tb, first, cache_file=cache)
    doc = json.loads(cache.read_text())
    assert doc["endpoints"] == eps(tb, 0, 1, 2) and doc["resource_version"]

    # API unreachable at start: the cache is what the daemon starts with; the
    # watcher reports nothing and does not touch the cache
    be.stop()
    saved = cache.read_text()
    log = ListLog()

    async def unreachable(r: Run):
        assert strs(r.w.endpoints) == eps(tb, 0, 1, 2)
        await r.until(lambda: r.w.errors >= 3, 2, "failures")
        assert r.reports == [] and cache.read_text() == saved
        await switch(be.start)
        # listed and compared with the cache (a list reports before the watch starts)
        await r.until(lambda: r.w.lists >= 1 and r.w.state == "watching", 2, "list after start")
        assert r.w.source == "api" and strs(r.w.store.endpoints()) == eps(tb, 0, 1, 2)
        assert r.reports == []  # same as the cache: nothing new to report
        await switch(tb.set_endpointslices, addrs(tb, 2))
        await r.report(eps(tb, 2))

    run_watcher(tb, unreachable, cache_file=cache, preload=True, log=log)
    assert json.loads(cache.read_text())["endpoints"] == eps(tb, 2)
    assert log.events("discovery_cache_loaded")[0]["endpoints"] == ",".join(eps(tb, 0, 1, 2))


@needs_root
def test_through_127_0_0_1_and_tls_server_name(tb):
    """The daemon's case: https://127.0.0.1:PORT verified as 127.0.0.1 (the
    kubeconfig's own server is ignored); otherwise the kubeconfig's
    tls-server-name; a name the certificate lacks fails and is retried."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tb.add_local_apiserver(port=port)

    async def ok(r: Run):
        await r.report(eps(tb, 0, 1, 2), timeout=3)

    run_watcher(tb, ok, server=f"https://127.0.0.1:{port}")

    def kc_with(name: str) -> str:
        path = tb.write_kubeconfig(server="https://203.0.113.1:6443")
        doc = json.loads(Path(path).read_text())
        doc["clusters"][0]["cluster"]["tls-server-name"] = name
        Path(path).write_text(json.dumps(doc))
        return path

    run_watcher(tb, ok, kubeconfig=kc_with("kubernetes.default.svc"))
    log = ListLog()

    async def bad(r: Run):
        await r.until(lambda: r.w.errors >= 2, 3, "failures")
        assert r.reports == []

    run_watcher(tb, bad, kubeconfig=kc_with("wrong.example"), log=log)
    err = log.events("discovery_error")[0]["error"]
    assert err.startswith("tls:") and "mismatch" in err, err
    # an explicit tls_server_name overrides the kubeconfig
    run_watcher(tb, ok, kubeconfig=kc_with("wrong.example"), tls_server_name="kubernetes")


@needs_root
def test_credentials_client_cert_data_token_file_and_401(tb):
    be = tb.backends[0]
    d = Path(tb.tmpdir)
    doc = {
        "apiVersion": "v1", "kind": "Config", "current-context": "node",
        "clusters": [{"name": "c", "cluster": {
            "server": "https://203.0.113.1:6443",
            "certificate-authority-data": b64(Path(tb.ca_file).read_bytes())}}],
        "users": [{"name": "u", "user": {
            "client-certificate-data": b64(Path(tb.client_cert_file).read_bytes()),
            "client-key-data": b64(Path(tb.client_key_file).read_bytes())}}],
        "contexts": [{"name": "node", "context": {"cluster": "c", "user": "u"}}],
    }
    (d / "kc-cert").write_text(yaml.safe_dump(doc))

    async def ok(r: Run):
        await r.report(eps(tb, 0, 1, 2), timeout=3)

    run_watcher(tb, ok, kubeconfig=str(d / "kc-cert"))
    st = tb.endpointslice_stats(be)
    assert st["last_client_cn"] == "system:prism-kernel" and st["last_auth"] == "cert"

    # token file: re-read for every connection; a rejected token is retried with backoff
    (d / "token").write_text("invalid-token")
    doc["users"][0]["user"] = {"tokenFile": str(d / "token")}
    (d / "kc-token").write_text(yaml.safe_dump(doc))
    log = ListLog()

    async def rotate(r: Run):
        await r.until(lambda: r.w.errors >= 2, 3, "401s")
        assert r.reports == []
        (d / "token").write_text("good-token")
        await r.report(eps(tb, 0, 1, 2), timeout=2)

    run_watcher(tb, rotate, kubeconfig=str(d / "kc-token"), log=log)
    err = log.events("discovery_error")[0]["error"]
    assert err.startswith("HTTP 401") and "endpointslices" in err, err
    assert tb.endpointslice_stats(be)["unauthorized"] >= 2


@needs_root
def test_ipv6_endpoints_over_ipv6(tb):
    v6 = tb.add_backend(ipv6=True)
    tb.set_endpointslices([v6.address, "2001:2:0:99::2", tb.backends[0].address])

    expected = strs(sorted([EndpointSpec(v6.address, 6443), EndpointSpec("2001:2:0:99::2", 6443),
                            EndpointSpec(tb.backends[0].address, 6443)], key=spec_sort_key))
    assert expected[0] == f"{tb.backends[0].address}:6443" and expected[1].startswith("[")

    async def scenario(r: Run):
        await r.report(expected, timeout=3)

    run_watcher(tb, scenario, server=v6.url)
    # both slices came from the IPv6 server; the first address's family is the
    # primary one, its slice named `kubernetes`
    types = {s["metadata"]["name"]: s["addressType"] for s in tb.endpointslices(v6)}
    assert types == {"kubernetes": "IPv6", "kubernetes-v4": "IPv4"}


@needs_root
def test_raw_slices_fqdn_deleted_slice_and_per_server_state(tb):
    be0, be1 = tb.backends[0], tb.backends[1]

    async def scenario(r: Run):
        await r.report(eps(tb, 0, 1, 2), timeout=3)
        slices = [es(["10.1.0.1"]), es(["2001:2:0:98::2"], family="IPv6", name="kubernetes-v6"),
                  es(["api.example.com"], family="FQDN", name="c")]
        await switch(tb.set_endpointslices, slices=slices)
        await r.report(["10.1.0.1:6443", "[2001:2:0:98::2]:6443"])
        await switch(tb.set_endpointslices, slices=[slices[0], slices[2]])  # the IPv6 slice deleted
        await r.report(["10.1.0.1:6443"])
        # only be1 changes: the watcher on be0 sees nothing of it, as a later
        # change on be0 shows (its events come in order)
        await switch(tb.set_endpointslices, ["10.2.0.1"], servers=[be1])
        await switch(tb.set_endpointslices, ["10.3.0.1"], servers=[be0])
        await r.report(["10.3.0.1:6443"])
        assert all("10.2.0.1:6443" not in rep for _t, rep in r.reports), r.reports

    run_watcher(tb, scenario)
    assert [s["metadata"]["name"] for s in tb.endpointslices(be0)] == ["kubernetes"]
    assert [s["addressType"] for s in tb.endpointslices(be1)] == ["IPv4"]
    assert strs(endpoints_from_slices(tb.endpointslices(be1))) == ["10.2.0.1:6443"]


@needs_root
def test_kubectl_against_the_fake(tb):
    """kubectl (client-go) lists and watches the fake's EndpointSlices."""
    be = tb.backends[0]
    tb.set_endpointslices(addrs(tb, 0, 1), not_ready=addrs(tb, 2))
    kc = tb.write_kubeconfig(server=be.url)
    base = ["/usr/bin/kubectl", "--kubeconfig", kc, "--cache-dir", f"{tb.tmpdir}/kube-cache",
            "get", "endpointslices", "-n", "default", "-l", SELECTOR]
    r = subprocess.run([*base, "-o", "json"], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=30)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [i["metadata"]["name"] for i in doc["items"]] == ["kubernetes"]
    assert doc["items"][0]["kind"] == "EndpointSlice"
    # what kubectl got is what the watcher would report
    assert strs(endpoints_from_slices(doc["items"])) == eps(tb, 0, 1)
    r = subprocess.run([*base, "-o", "jsonpath={.items[0].metadata.resourceVersion}"],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30)
    assert r.returncode == 0 and int(r.stdout) == tb.endpointslice_rv
    # a label that selects nothing
    r = subprocess.run([*base[:-1], "kubernetes.io/service-name=other", "-o", "json"],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30)
    assert r.returncode == 0 and json.loads(r.stdout)["items"] == []
    # kubectl get -w: list, then watch from its resourceVersion
    w = subprocess.Popen([*base, "-w", "--output-watch-events", "-o", "json",
                          "--request-timeout=4s"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 10
        while tb.endpointslice_stats(be)["active_watches"] < 1:
            assert time.monotonic() < deadline and w.poll() is None, w.stderr.read()
            time.sleep(0.05)
        tb.set_endpointslices(addrs(tb, 2))
        out, err = w.communicate(timeout=20)
    finally:
        if w.poll() is None:
            w.kill()
            w.communicate()
    dec, pos, events = json.JSONDecoder(), 0, []
    while pos < len(out.strip()):
        obj, n = dec.raw_decode(out, pos)
        events.append(obj)
        pos = n
        while pos < len(out) and out[pos].isspace():
            pos += 1
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED"], (out, err)
    assert strs(endpoints_from_slices([events[-1]["object"]])) == eps(tb, 2)
