"""sd_notify without libsystemd, and the daemon's start-retry backoff (no
kernel, no root). The end-to-end checks with a real daemon are in
tests/test_never_flip.py."""

from __future__ import annotations

import os
import socket

import pytest

from prism_kernel.control import sdnotify
from prism_kernel.control.start import START_RETRY_JITTER, START_RETRY_MAX, start_retry_delay


def _receiver(tmp_path, abstract: bool) -> tuple[socket.socket, str]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"pk-sdnotify-test-{os.getpid()}"
        s.bind("\0" + name)
        return s, "@" + name
    path = str(tmp_path / "notify.sock")
    s.bind(path)
    return s, path


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_sends_one_datagram_of_key_value_lines(tmp_path, monkeypatch, abstract):
    s, addr = _receiver(tmp_path, abstract)
    with s:
        monkeypatch.setenv("NOTIFY_SOCKET", addr)
        assert sdnotify.notify(READY=1, STATUS="steering\nto 3   backends") is True
        s.settimeout(5)
        assert s.recv(4096) == b"READY=1\nSTATUS=steering to 3 backends"  # a value stays one line


def test_notify_without_systemd_sends_nothing_and_never_fails(tmp_path, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify(READY=1) is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sdnotify.notify(READY=1) is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")  # not supported here: ignored
    assert sdnotify.notify(READY=1) is False


def test_long_status_is_cut():
    assert len(sdnotify._one_line("x" * 5000)) == 400


def test_start_retry_delay_doubles_from_1s_to_60s_with_jitter():
    lo = [start_retry_delay(n, lambda a, b: a) for n in range(1, 12)]
    hi = [start_retry_delay(n, lambda a, b: b) for n in range(1, 12)]
    mid = [start_retry_delay(n, lambda a, b: (a + b) / 2) for n in range(1, 12)]
    assert mid[:7] == [1, 2, 4, 8, 16, 32, 60]
    assert all(m == START_RETRY_MAX for m in mid[6:])
    assert lo[0] == pytest.approx(1 - START_RETRY_JITTER) and hi[0] == pytest.approx(1 + START_RETRY_JITTER)
    assert max(hi) == START_RETRY_MAX  # bounded, jitter included
    for _ in range(200):
        assert 0.8 <= start_retry_delay(1) <= 1.2
