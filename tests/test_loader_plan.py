"""Which eBPF loader is tried, in which order, and why
(prism_kernel/datapath/ebpf/loading.py, loader_plan): pure logic, no root."""

from __future__ import annotations

import itertools

import pytest

from prism_kernel.datapath.ebpf import loading as ebpf
from prism_kernel.errors import DatapathUnavailable


@pytest.fixture
def node(monkeypatch, tmp_path):
    """A node where libbpf, the object and bcc are each there or not."""
    obj = tmp_path / "prism_sock.bpf.o"

    def make(libbpf: bool, has_object: bool, bcc: bool):
        monkeypatch.setattr(ebpf, "libbpf_missing", lambda: None if libbpf else "no libbpf.so.1")
        monkeypatch.setattr(ebpf, "bcc_missing", lambda: None if bcc else "no bcc")
        if has_object:
            obj.write_bytes(b"\x7fELF")
        elif obj.exists():
            obj.unlink()
        return obj

    return make


@pytest.mark.parametrize("libbpf,has_object,bcc", list(itertools.product([True, False], repeat=3)))
def test_auto(node, libbpf, has_object, bcc):
    obj = node(libbpf, has_object, bcc)
    if not (libbpf and has_object) and not bcc:
        with pytest.raises(DatapathUnavailable) as e:
            ebpf.loader_plan("auto", obj)
        assert "libbpf" in e.value.reason and "bcc" in e.value.reason
        return
    plan = ebpf.loader_plan("auto", obj)
    names = [n for n, _ in plan]
    expected = (["libbpf"] if libbpf and has_object else []) + (["bcc"] if bcc else [])
    assert names == expected
    if names == ["bcc"]:  # the fallback says why libbpf is not used
        assert "no libbpf.so.1" in plan[0][1] or "no precompiled object" in plan[0][1]
    if names == ["libbpf", "bcc"]:
        assert "if libbpf's load fails" in plan[1][1]


@pytest.mark.parametrize("libbpf,has_object,bcc", list(itertools.product([True, False], repeat=3)))
def test_explicit_loaders_never_substitute(node, libbpf, has_object, bcc):
    obj = node(libbpf, has_object, bcc)
    if libbpf and has_object:
        assert [n for n, _ in ebpf.loader_plan("libbpf", obj)] == ["libbpf"]
    else:
        with pytest.raises(DatapathUnavailable, match="ebpf.loader libbpf"):
            ebpf.loader_plan("libbpf", obj)
    if bcc:
        assert [n for n, _ in ebpf.loader_plan("bcc", obj)] == ["bcc"]
    else:
        with pytest.raises(DatapathUnavailable, match="ebpf.loader bcc"):
            ebpf.loader_plan("bcc", obj)
