"""The kernel feature probes (prism_kernel/datapath/ebpf/features.py): they
answer what this kernel can do, never "not supported" for what they could
not ask, and the sock_diag requests they pack match pyroute2's encoding.
The probes load tiny programs freed at once and send requests that match no
socket: nothing is left in the kernel."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from prism_kernel.datapath.ebpf import features as bpf_features

REPO = Path(__file__).resolve().parents[1]
needs_root = pytest.mark.kernel  # the probes load programs: root


@needs_root
def test_every_probe_passes_on_this_kernel():
    failed = [(f.id, f.detail) for f in bpf_features.probe_all() if f.ok is not True]
    assert failed == []
    assert bpf_features.missing() == []


@needs_root
def test_without_privileges_a_probe_says_so_and_never_not_supported():
    """As nobody without capabilities: libbpf's probes would answer "not
    supported" for a refused load; each probe is unknown (None) instead, or
    answered where no privilege is needed."""
    script = ("import json; from prism_kernel.datapath.ebpf import features as f; "
              "print(json.dumps([[x.id, x.ok, x.detail] for x in f.probe_all()]))")
    r = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                        "--inh-caps=-all", sys.executable, "-c", script],
                       capture_output=True, text=True, timeout=60, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    features = json.loads(r.stdout)
    assert [f for f in features if f[1] is False] == []
    assert any(f[1] is None and "CAP_BPF" in f[2] for f in features), features


def test_diag_request_matches_pyroute2s_encoding():
    """The probes pack inet_diag_req_v2 by hand (no pyroute2 import before the
    data path is installed): the same bytes pyroute2 builds."""
    from pyroute2.netlink.diag import inet_diag_req

    req = inet_diag_req()
    req["header"].update({"type": 20, "flags": 0x301, "sequence_number": 1, "pid": 0})
    req["sdiag_family"], req["sdiag_protocol"], req["idiag_ext"] = socket.AF_INET, socket.IPPROTO_TCP, 0
    req["idiag_states"], req["idiag_sport"], req["idiag_dport"] = 0, 1, 1
    req["idiag_src"] = req["idiag_dst"] = (0x7F000001, 0, 0, 0)
    req["idiag_if"], req["idiag_cookie"] = 0, (1 << 64) - 1
    req.encode()
    assert bpf_features._diag_request(20, 0x301, cookie=(1 << 64) - 1) == bytes(req.data)


@needs_root
def test_sock_diag_probes_tell_support_from_absence(monkeypatch):
    """What an old kernel would answer, asked of this one: a dump without the
    storage attribute succeeds (an old kernel ignores the attribute), and a
    protocol without a diag handler answers ENOENT to everything, which must
    not read as "SOCK_DESTROY supported"."""
    assert bpf_features._diag_errno(bpf_features._diag_request(20, 0x301, cookie=(1 << 64) - 1)) == 0
    real = bpf_features._diag_request
    monkeypatch.setattr(bpf_features, "_diag_request",
                        lambda *a, **kw: real(*a, **{**kw, "protocol": 200}))
    found = {f.id: f for f in bpf_features._sock_diag()}
    assert found["sock_diag.destroy"].ok is False and found["sock_diag.sk_storage"].ok is False
    assert "no TCP sock_diag" in found["sock_diag.destroy"].detail
