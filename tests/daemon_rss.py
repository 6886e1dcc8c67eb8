"""The long-lived daemon's resident memory, measured as the README states it:
`prism-kernel run` against three test hosts (readyz probes every second,
metrics server on), VmRSS and VmHWM read 5 s after the data path is ready.
With --discovery the EndpointSlice watcher runs too (list, then a watch
through 127.0.0.1:PORT), so both users of the HTTP/1.1 client are loaded.

    flock /run/prism-kernel-hosttests.lock .venv/bin/python -m tests.daemon_rss [--discovery]

--import-cost PKG: no daemon, no root; the Python heap that importing PKG
costs when the daemon's modules are imported (tracemalloc, every allocation
with a frame of PKG on its stack).

    .venv/bin/python -m tests.daemon_rss --import-cost h11

A measurement, not a test: it prints figures (docs/design/http-client.md
quotes them) and asserts nothing. Root; the test hosts live in network
namespaces and are removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from tests.harness import REPO, TEST_INSTANCE, Daemon, cleanup_instance

PREFIX = "pkm"  # a testbed prefix and addresses of its own: never the suites' hosts
NET_OFFSET = 120  # 198.18.121.0/24 ...
SETTLE_S = 5.0  # what the README's figure is: RSS after 5 s of steady probing


def status_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in open(f"/proc/{pid}/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def measure(tb, datapath: str, discovery: bool) -> dict:
    extra: list[str] = []
    static = [b.endpoint for b in tb.backends]
    if discovery:
        tb.set_endpointslices([b.address for b in tb.backends])
        conf = Path(tb.tmpdir) / "config.json"
        conf.write_text(json.dumps({"discovery": {
            "enabled": True, "kubeconfig": tb.write_kubeconfig(server="https://192.0.2.1:6443"),
            "cache_file": str(Path(tb.tmpdir) / f"discovered-{time.monotonic_ns()}.json"),  # none yet: a list
            "tls_server_name": "kubernetes"}}))
        extra = ["--config", str(conf)]
        static = static[:1]  # the other two come from the EndpointSlices
    try:
        with Daemon(static, datapath, tb.ca_file, tb.tmpdir, interval=1.0, extra=extra) as d:
            d.wait_ready()
            d.wait_active({b.endpoint for b in tb.backends}, timeout=15)
            if discovery:
                d.wait_event("discovered", timeout=15)
            time.sleep(SETTLE_S)  # the figure is defined as RSS after 5 s of steady state
            return status_kb(d.proc.pid)
    finally:
        cleanup_instance(TEST_INSTANCE)


_IMPORT_COST = """
import sys, tracemalloc
import prism_kernel.cli, prism_kernel.control.supervisor  # what `prism-kernel run` imports
pkg = sys.argv[1]
assert pkg in sys.modules, f"the daemon does not import {pkg}"
snap = tracemalloc.take_snapshot()
mine = snap.filter_traces([tracemalloc.Filter(True, f"*/{pkg}/*", all_frames=True)])
size = lambda s: sum(t.size for t in s.traces)
print(f"{pkg}: {size(mine) / 1024:.0f} KiB of the {size(snap) / 2**20:.1f} MiB Python heap after the daemon's imports")
"""


def import_cost(pkg: str) -> None:
    # tracemalloc from the interpreter's start, with deep stacks: an allocation
    # counts for PKG when any frame of its stack is in PKG (its imports too).
    subprocess.run([sys.executable, "-X", "tracemalloc=64", "-c", _IMPORT_COST, pkg], cwd=REPO, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datapath", action="append", choices=["ebpf", "nftables"])
    ap.add_argument("--discovery", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--import-cost", metavar="PKG")
    args = ap.parse_args()
    if args.import_cost:
        import_cost(args.import_cost)
        return
    from tests.testbed import Testbed, clear_stale

    clear_stale(PREFIX)
    with Testbed(n_backends=3, prefix=PREFIX, net_offset=NET_OFFSET) as tb:
        for dp in args.datapath or ["ebpf", "nftables"]:
            for i in range(args.rounds):
                kb = measure(tb, dp, args.discovery)
                print(f"{dp:8} discovery={'on' if args.discovery else 'off'} round {i + 1}: "
                      f"VmRSS {kb['VmRSS'] / 1024:.1f} MB  VmHWM {kb['VmHWM'] / 1024:.1f} MB", flush=True)


if __name__ == "__main__":
    main()
