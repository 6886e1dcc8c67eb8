"""Trusted discovery, end to end: a daemon with discovery on, against fake
API servers that serve kube-apiserver's own `kubernetes` EndpointSlice next
to slices someone else injected (another name, a controller's managed-by
label, a name that does not match its addressType). The injected slices
name a healthy API server the daemon would steer to if it believed them; it
never does, until kube-apiserver's own slice names it.

    flock /run/prism-kernel-hosttests.lock .venv/bin/python -m pytest -q tests/test_discovery_trust.py
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from tests.harness import Daemon, client_context, who

pytestmark = pytest.mark.kernel

MANAGED_BY = "endpointslice.kubernetes.io/managed-by"


def injected_slices(tb, address: str) -> list[dict]:
    """Slices that name `address` and are not kube-apiserver's."""
    base = tb.endpointslice_objects([address], tb.port)[0]
    other_name = copy.deepcopy(base)
    other_name["metadata"]["name"] = "kubernetes-extra"
    managed = copy.deepcopy(base)
    managed["metadata"]["name"] = "kubernetes-7xq2v"
    managed["metadata"]["labels"][MANAGED_BY] = "endpointslice-controller.k8s.io"
    wrong_type = copy.deepcopy(base)
    wrong_type["metadata"]["name"] = "kubernetes-v6"  # an IPv4 slice under the IPv6 secondary name
    return [other_name, managed, wrong_type]


@pytest.mark.parametrize("datapath", ["ebpf"])  # which slices are believed does not depend on the data path
def test_injected_endpointslices_are_never_steered_to(testbed, datapath):
    tb = testbed
    be0, be1, be2 = tb.backends
    real = tb.endpointslice_objects([be0.address, be1.address], tb.port)
    injected = injected_slices(tb, be2.address)
    tb.set_endpointslices(slices=real + injected)
    kubeconfig = tb.write_kubeconfig(server="https://192.0.2.1:6443")  # replaced by 127.0.0.1:PORT
    conf = Path(tb.tmpdir) / "config.yaml"
    conf.write_text(json.dumps({"discovery": {
        "enabled": True, "kubeconfig": kubeconfig, "cache_file": str(Path(tb.tmpdir) / "discovered.json"),
        "tls_server_name": "kubernetes"}}))
    ctx = client_context(tb.ca_file)
    with Daemon([be0.endpoint], datapath, tb.ca_file, tb.tmpdir, extra=["--config", str(conf)]) as d:
        d.wait_ready()
        for sl in injected:
            d.wait_event("discovery_slice_ignored", name=sl["metadata"]["name"])
        discovered = d.wait_event("discovered")
        assert discovered["endpoints"] == f"{be0.endpoint},{be1.endpoint}", discovered
        d.wait_serving({be0.endpoint, be1.endpoint}, timeout=15)
        d.wait_probe_rounds(3, {be0.endpoint, be1.endpoint})
        reached = {who(ctx) for _ in range(20)}
        assert reached <= {"be0", "be1"}, reached
        st = d.status()
        assert be2.endpoint not in {b["address"] for b in st["state"]["backends"]}, st
        assert st["state"]["discovery"]["ignored_slices"] == len(injected), st["state"]["discovery"]
        # never a backend: not probed, not up, not removed
        assert not [e for e in d.events() if e.get("address") == be2.endpoint], d.log_path.read_text()
        # Not a test of an unreachable host: once kube-apiserver's own slice
        # names be2, it is steered to.
        tb.set_endpointslices(slices=tb.endpointslice_objects(
            [be0.address, be1.address, be2.address], tb.port) + injected)
        d.wait_serving({be0.endpoint, be1.endpoint, be2.endpoint}, timeout=15)
