import asyncio
import ipaddress
import re

import pytest

from prism_kernel.core.model import Backend
from prism_kernel.sources.endpoints import EndpointSpec, parse_endpoint, resolve


@pytest.mark.parametrize("text,host,port", [
    ("198.18.1.2:6443", "198.18.1.2", 6443),
    ("[2001:2::1]:6443", "2001:2::1", 6443),
    ("cp.example.com:443", "cp.example.com", 443),
    ("https://cp.example.com:6443/", "cp.example.com", 6443),
    ("  localhost:1  ", "localhost", 1),
    ("node-1:65535", "node-1", 65535),
])
def test_parse_valid(text, host, port):
    assert parse_endpoint(text) == EndpointSpec(host, port)


@pytest.mark.parametrize("text,fragment", [
    ("", "empty"),
    ("198.18.1.2", "no port"),
    ("198.18.1.2:0", "out of range"),
    ("198.18.1.2:65536", "out of range"),
    ("198.18.1.2:https", "not a number"),
    ("2001:2::1:6443", "in brackets"),
    ("[198.18.1.2]:6443", "not an IPv6"),
    ("[2001:2::1]6443", "expected [IPv6]:PORT"),
    ("256.1.1.1:6443", "not a valid IPv4"),
    ("bad_name:6443", "neither an IP address nor a valid DNS name"),
    ("-bad.example:6443", "neither"),
    ("http://x:1", "only https://"),
    (":6443", "no host"),
])
def test_parse_invalid_names_the_problem(text, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_endpoint(text)


def test_str_round_trips():
    for t in ["198.18.1.2:6443", "[2001:2::1]:6443", "cp.example.com:443"]:
        assert str(parse_endpoint(t)) == t


def test_resolve_ip_needs_no_dns():
    got = asyncio.run(resolve(parse_endpoint("198.18.1.2:6443")))
    assert got == [Backend(4, ipaddress.ip_address("198.18.1.2"), 6443)]


def test_resolve_name_gives_every_address():
    # "localhost" resolves from /etc/hosts: no DNS traffic leaves the machine.
    got = asyncio.run(resolve(parse_endpoint("localhost:6443")))
    assert Backend.of("127.0.0.1", 6443) in got
    assert got == sorted(got)


def test_resolve_failure_raises():
    with pytest.raises(OSError):
        asyncio.run(resolve(parse_endpoint("does-not-exist.invalid:6443")))
