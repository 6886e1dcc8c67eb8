"""Hold a data path open like the daemon would: install, print "ready", idle
until stdin closes, exit leaving the kernel state in place (the benchmark's
target teardown removes it). Its CPU time and RSS are the daemon-side cost.

    python -m bench.holder --datapath nftables --instance X --port P --backend A:PORT
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datapath", required=True)
    ap.add_argument("--instance", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--backend", action="append", required=True)
    ap.add_argument("--ebpf-loader", default="auto", help="eBPF: libbpf, bcc or auto")
    ap.add_argument("--naive", action="store_true",
                    help="nftables: leave net.ipv4.tcp_timestamps alone (the data path before the fix)")
    a = ap.parse_args(argv)

    from prism_kernel.core.model import Backend
    from prism_kernel.datapath import datapath_class
    from prism_kernel.datapath.base import DatapathSettings

    cls = datapath_class(a.datapath)
    if a.naive:
        cls = type(f"Naive{cls.__name__}", (cls,), {"fix_tcp_timestamps": False})
    settings = DatapathSettings(listen_port=a.port, instance=a.instance, ebpf_loader=a.ebpf_loader)
    cls.check_available(settings)
    dp = cls(settings)
    backends = []
    for spec in a.backend:
        host, _, port = spec.rpartition(":")
        backends.append(Backend.of(host.strip("[]"), int(port)))
    dp.install(backends)
    dp.apply(backends)
    print("ready", flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
    dp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
