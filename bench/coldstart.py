"""Cold-start benchmark: from `prism-kernel run` starting on a node with
nothing installed to the first request served through 127.0.0.1:PORT, per
data path and eBPF loader; and the loader's cost (time, peak RSS). Not a
test: it prints figures.

    packaging/dev.sh bench-coldstart        # = .venv/bin/python -m bench.coldstart

Each round starts from a clean kernel (the instance's state removed), runs
the daemon with default probe settings (readyz over TLS, 1 s interval)
against one fake API server in a network namespace, and polls the listen
address with HTTPS requests (a refused connect is retried after 2 ms) until
one is answered. Targets alternate within a round; medians over rounds.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.harness import Daemon, cleanup_instance, client_context  # noqa: E402
from tests.testbed import Testbed, clear_stale  # noqa: E402

PREFIX = "pkcs"
PORT = 17449
INSTANCE = "pk-coldstart"
TARGETS = {  # name -> (datapath, extra flags)
    "ebpf-libbpf": ("ebpf", ["--ebpf-loader", "libbpf"]),
    "ebpf-bcc": ("ebpf", ["--ebpf-loader", "bcc"]),
    "nftables": ("nftables", []),
}


def first_answer(ctx: ssl.SSLContext, deadline: float) -> float:
    """monotonic time of the first HTTPS answer through 127.0.0.1:PORT."""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", PORT), timeout=1.0) as raw:
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    s.sendall(b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if s.recv(64).startswith(b"HTTP/1.1 200"):
                        return time.monotonic()
        except OSError:
            time.sleep(0.002)  # nothing steers yet: the connect was refused
    raise TimeoutError("no answer through the listen address")


def one_run(tb: Testbed, target: str, tmp: str) -> dict:
    cleanup_instance(INSTANCE)
    datapath, extra = TARGETS[target]
    be = tb.backends[0]
    ctx = client_context(tb.ca_file)
    t0 = time.monotonic()
    d = Daemon([be.endpoint], datapath, tb.ca_file, tmp, port=PORT, instance=INSTANCE, interval=1.0,
               timeout=0.5, extra=extra)
    try:
        t1 = first_answer(ctx, t0 + 30)
        ready = d.wait_ready()
        return {"target": target, "cold_start_s": t1 - t0, "loader": ready.get("loader"),
                "load_s": ready.get("load_s"), "loader_rss_mb": (ready.get("maxrss_kb") or 0) / 1024}
    finally:
        d.stop()
        cleanup_instance(INSTANCE)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--targets", default=",".join(TARGETS))
    args = ap.parse_args()
    targets = args.targets.split(",")
    for t in targets:
        if t not in TARGETS:
            ap.error(f"unknown target {t!r} ({', '.join(TARGETS)})")
    clear_stale(PREFIX)
    results: dict[str, list[dict]] = {t: [] for t in targets}
    with Testbed(n_backends=1, prefix=PREFIX) as tb:
        for r in range(args.rounds):
            for t in (targets if r % 2 == 0 else list(reversed(targets))):
                res = one_run(tb, t, tb.tmpdir)
                results[t].append(res)
                print(f"round {r + 1} {t:12s} cold start {res['cold_start_s']:.3f} s  loader "
                      f"{res['loader'] or '-'} {res['load_s'] if res['load_s'] is not None else '-'} s "
                      f"{res['loader_rss_mb']:.0f} MB", flush=True)
    print(f"\n| target | cold start, median | max | loader | load, median | loader peak RSS |")
    print("|---|--:|--:|---|--:|--:|")
    for t in targets:
        rs = results[t]
        cs = [x["cold_start_s"] for x in rs]
        loads = [x["load_s"] for x in rs if x["load_s"] is not None]
        rss = [x["loader_rss_mb"] for x in rs if x["loader_rss_mb"]]
        print(f"| {t} | {statistics.median(cs):.2f} s | {max(cs):.2f} s | {rs[0]['loader'] or '-'} | "
              f"{(f'{statistics.median(loads):.3f} s') if loads else '-'} | "
              f"{(f'{max(rss):.0f} MB') if rss else '-'} |")
    kernel = subprocess.run(["uname", "-r"], capture_output=True, text=True).stdout.strip()
    print(f"\n{args.rounds} rounds, Linux {kernel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
