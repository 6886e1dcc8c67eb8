"""Idle benchmark: what the daemon costs a node when nothing happens. Not a
test: it prints figures.

    .venv/bin/python -m bench.idle                    # both data paths, 30 s each, 3 rounds
    .venv/bin/python -m bench.idle --datapaths ebpf --seconds 60

For each data path, `prism-kernel run` with default probe settings (readyz
over TLS every 1 s) in front of three fake API servers in network
namespaces, nobody connecting through it; once every backend is serving and
5 s have passed, its CPU time (user + system, from /proc) over `--seconds`,
and its RSS at the end. The data path itself costs nothing here: it is in
the kernel. Data paths alternate within a round; medians over rounds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.run import proc_cost  # noqa: E402
from tests.harness import Daemon, cleanup_instance  # noqa: E402
from tests.testbed import Testbed, clear_stale  # noqa: E402

PREFIX = "pkid"


def one_run(tb: Testbed, datapath: str, seconds: float, tmp: str) -> tuple[float, float, float]:
    """(CPU % of one core, RSS MiB at the start and at the end of the
    window) of an idle daemon."""
    d = Daemon([b.endpoint for b in tb.backends], datapath, tb.ca_file, tmp, interval=1.0)
    try:
        d.wait_ready()
        d.wait_active({b.endpoint for b in tb.backends})
        time.sleep(5.0)  # the start's work (loading, first probes) is done
        assert d.proc is not None
        (c0, r0), t0 = proc_cost([d.proc.pid]), time.monotonic()
        time.sleep(seconds)
        (c1, r1), t1 = proc_cost([d.proc.pid]), time.monotonic()
        return 100 * (c1 - c0) / (t1 - t0), r0, r1
    finally:
        d.stop()
        cleanup_instance()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.idle")
    ap.add_argument("--datapaths", default="ebpf,nftables")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.idle: needs root (network namespaces, the data path)", file=sys.stderr)
        return 2
    datapaths = a.datapaths.split(",")
    clear_stale(PREFIX)
    cleanup_instance()
    results: dict[str, list[tuple[float, float, float]]] = {dp: [] for dp in datapaths}
    start = time.monotonic()
    with Testbed(n_backends=3, prefix=PREFIX) as tb, tempfile.TemporaryDirectory(prefix="pkid-") as tmp:
        for rnd in range(a.rounds):
            order = datapaths if rnd % 2 == 0 else list(reversed(datapaths))
            for dp in order:
                cpu, rss0, rss = one_run(tb, dp, a.seconds, tmp)
                results[dp].append((cpu, rss0, rss))
                print(f"idle: round {rnd + 1}/{a.rounds} {dp:8} CPU {cpu:.2f} % of a core, "
                      f"RSS {rss0:.1f} -> {rss:.1f} MiB", file=sys.stderr, flush=True)
    print(f"\n`python -m bench.idle` — {a.rounds} rounds × {a.seconds:.0f} s, 3 backends, readyz every 1 s, "
          f"{time.monotonic() - start:.0f} s total\n")
    print("| data path | CPU % of one core (median, min–max) | RSS MiB at the window's start | at its end |")
    print("|---|--:|--:|--:|")
    for dp, rs in results.items():
        cpus = [c for c, _, _ in rs]
        print(f"| {dp} | {statistics.median(cpus):.2f} ({min(cpus):.2f}–{max(cpus):.2f}) "
              f"| {statistics.median([r for _, r, _ in rs]):.1f} | {statistics.median([r for _, _, r in rs]):.1f} |")
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"idle-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"seconds": a.seconds, "rounds": a.rounds, "runs": {
        dp: [{"cpu_pct": round(c, 3), "rss_mib_start": round(r0, 1), "rss_mib_end": round(r, 1)}
             for c, r0, r in rs] for dp, rs in results.items()}},
        indent=1))
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
