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
    ("HTTPS://198.18.31.2:8080", "198.18.31.2", 8080),
    ("https://[2001:2:0:31::2]:8080", "2001:2:0:31::2", 8080),
    ("  localhost:1  ", "localhost", 1),
    ("node-1:65535", "node-1", 65535),
    # one spelling per endpoint
    ("[2001:2:0:31:0:0:0:2]:8080", "2001:2:0:31::2", 8080),
    ("[2001:0002:0000:0031::0002]:8080", "2001:2:0:31::2", 8080),
    ("[2001:2:0:31::ABCD]:8080", "2001:2:0:31::abcd", 8080),
    ("CP.Example.COM:6443", "cp.example.com", 6443),
    ("cp.example.com.:6443", "cp.example.com", 6443),
    ("198.18.1.2:06443", "198.18.1.2", 6443),
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
    (":6443", "no host"),
    # URLs: https://HOST:PORT only, and the message says what to write
    ("http://198.18.31.2:8080", "only https://HOST:PORT URLs are accepted"),
    ("ftp://198.18.31.2:8080", "only https://HOST:PORT URLs are accepted"),
    ("https://198.18.31.2:8080/api", "a URL with a path, query or fragment ('/api')"),
    ("https://198.18.31.2:8080?x=1", "a URL with a path, query or fragment ('?x=1')"),
    ("https://198.18.31.2:8080#f", "a URL with a path, query or fragment ('#f')"),
    ("https://admin:secret@198.18.31.2:8080", "user information (user@) is not accepted"),
    ("https://198.18.31.2", "no port: write https://HOST:PORT"),
    ("https://[2001:2::1]", "no port: write https://HOST:PORT"),
    ("https://", "no host: write https://HOST:PORT"),
    # ports are ASCII digits (str.isdigit() also takes these)
    ("198.18.1.2:\u00b2", "port '\u00b2' is not a number"),
    ("198.18.1.2:\u0661\u0662", "is not a number"),
    ("198.18.1.2:+443", "is not a number"),
    # addresses no connection can go to
    ("0.0.0.0:6443", "not a unicast address"),
    ("224.0.0.1:6443", "not a unicast address"),
    ("255.255.255.255:6443", "not a unicast address"),
    ("240.0.0.1:6443", "not a unicast address"),
    ("[::]:6443", "not a unicast address"),
    ("[ff02::1]:6443", "not a unicast address"),
    ("[fe80::1]:6443", "link-local, which needs a zone index"),
    ("[fe80::1%eth0]:6443", "a zone index (%...) is not supported"),
    ("[::ffff:198.18.1.2]:6443", "write it as 198.18.1.2:PORT"),
    ("01.2.3.4:6443", "not a valid IPv4 address"),
    ("a" * 64 + ".example:6443", "neither an IP address nor a valid DNS name"),
    (".".join(["a" * 63] * 4) + ":6443", "neither an IP address nor a valid DNS name"),
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
