"""Failover benchmark: how fast each fault is handled, per data path, with
default settings. Not a test: it prints figures.

    packaging/dev.sh bench-failover     # = .venv/bin/python -m bench.failover

For each fault and data path (alternating, `--rounds` each), three fake API
servers on hosts in network namespaces, the daemon in front of them, a
client opening new connections at ~150/s (2 s timeout per attempt, one
retry) and one long-lived stream per backend. Figures, from the fault:
  detect   the daemon's backend_down line
  no-new   the last new connection that reached the bad backend (the last
           first attempt that failed; for drain, the last request it served)
  longest  the longest request, its retry included
  stream   when the stream to the bad backend was closed, after detection
           (drain: the stream must stay open: "kept")

Then a WAN run per data path (`--wan-seconds`, 60 by default; 0 skips it):
the daemon in front of one backend whose host delays every packet it sends
by `--wan-delay` (80 ms: a managed control plane across a continent), new
connections through 127.0.0.1:PORT for that long, and what must not happen:
a SYN timeout counted by the kernel, a suspect mark, a backend_down, a
failed request. The backend's initial SYN RTO (status) is reported.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.harness import Daemon, RecordingClient, cleanup_instance, client_context, open_streams  # noqa: E402
from tests.testbed import Testbed, clear_stale  # noqa: E402

PREFIX = "pkfb"
FAULTS = ("refused", "blackhole", "frozen", "drain")


def _ts(iso: str) -> float:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def one_run(tb: Testbed, datapath: str, fault: str, tmp: str) -> dict:
    victim = tb.backends[1]
    ctx = client_context(tb.ca_file)
    d = Daemon([b.endpoint for b in tb.backends], datapath, tb.ca_file, tmp, interval=1.0, timeout=0.5,
               rise=2, fall=2)
    try:
        d.wait_ready()
        d.wait_active({b.endpoint for b in tb.backends})
        streams = open_streams(ctx, {"be0", "be1", "be2"})
        # 50 ms retry backoff: the harsher setting the published figures were measured with.
        with RecordingClient(ctx, rate=150, timeout=2.0, retry_delay=0.05) as client:
            # A random phase against the probe schedule (1 s): otherwise the
            # fault lands at the same point of every run's probe cycle and
            # the detection time shows that phase, not the distribution.
            time.sleep(1.5 + random.uniform(0.0, 1.0))
            # The victim's initial SYN RTO when the fault comes (eBPF: it
            # follows the probes' latencies, so load on the node moves it).
            rto = next((b.get("syn_rto_ms") for b in d.status()["state"]["backends"]
                        if b["address"] == victim.endpoint), None)
            t_mono, t_wall = time.monotonic(), time.time()
            {"refused": victim.stop, "blackhole": lambda: victim.blackhole(True), "frozen": victim.freeze,
             "drain": lambda: victim.drain(True)}[fault]()
            time.sleep(5.0)
        down = next((e for e in d.events() if e["event"] == "backend_down" and e["address"] == victim.endpoint
                     and _ts(e["ts"]) >= t_wall - 0.05), None)
        detect = _ts(down["ts"]) - t_wall if down else None
        # When the daemon read the kernel's report (a refusal or SYN timeout
        # of a steered connect): the rest of `detect` is the confirmation.
        seen = next((e for e in d.events() if e["event"] == "passive_failure"
                     and e["address"] == victim.endpoint and _ts(e["ts"]) >= t_wall - 0.05), None)
        if fault == "drain":
            served = [r.t0 - t_mono for r in client.requests if r.backend == "be1" and r.t0 >= t_mono]
            no_new = max(served) if served else 0.0
            stream = "kept" if streams["be1"].alive else "CUT"
        else:
            no_new = client.last_first_try_failure(t_mono) or 0.0
            s = streams["be1"]
            stream = (None if s.alive or detect is None else round(s.closed_at - (t_mono + detect), 3))
        for s in streams.values():
            s.close()
        return {
            "datapath": datapath, "fault": fault, "detect_s": None if detect is None else round(detect, 3),
            "no_new_s": round(no_new, 3), "longest_s": round(client.longest(), 3),
            "failed": len(client.failed()), "requests": len(client.requests), "stream_close_s": stream,
            "reason": down["reason"] if down else None, "syn_rto_ms": rto,
            "kernel_seen_s": None if seen is None else round(_ts(seen["ts"]) - t_wall, 3),
            # each failed request: when it started (s from the fault) and both attempts' errors
            "failures": [{"t0_s": round(r.t0 - t_mono, 3), "first": r.first_error, "retry": r.retry_error}
                         for r in client.failed()],
        }
    finally:
        d.stop()
        {"refused": victim.start, "blackhole": lambda: victim.blackhole(False), "frozen": victim.thaw,
         "drain": lambda: victim.drain(False)}[fault]()
        cleanup_instance()


def wan_run(tb: Testbed, datapath: str, tmp: str, seconds: float, delay: float) -> dict:
    far = tb.backends[2]
    far.link_delay(delay)
    ctx = client_context(tb.ca_file)
    # A first probe is three round trips (TCP, TLS, HTTP): 0.5 s holds them at 80 ms.
    d = Daemon([far.endpoint], datapath, tb.ca_file, tmp, interval=1.0, timeout=0.5, rise=2, fall=2)
    try:
        d.wait_ready()
        d.wait_active({far.endpoint}, timeout=30)
        mark = len(d.events())
        # Each request is three round trips: 16 threads keep ~60 new connections/s going.
        with RecordingClient(ctx, rate=60, threads=16, timeout=2.0, max_seconds=seconds) as client:
            client.wait_requests(1, timeout=30)
            end = time.monotonic() + seconds
            while time.monotonic() < end and all(t.is_alive() for t in client._workers):
                time.sleep(0.5)  # the load runs for `seconds` (RecordingClient stops itself then)
        new = d.events()[mark:]
        row = next(b for b in d.status()["state"]["backends"] if b["address"] == far.endpoint)
        return {
            "datapath": datapath, "fault": "wan", "delay_s": delay, "seconds": seconds,
            "requests": len(client.requests), "failed": len(client.failed()),
            "passive_failures": sum(1 for e in new if e["event"] == "passive_failure"),
            "backend_down": sum(1 for e in new if e["event"] == "backend_down"),
            "latency_ms": row.get("latency_ms"), "syn_rto_ms": row.get("syn_rto_ms"),
            "longest_s": round(client.longest(), 3),
        }
    finally:
        d.stop()
        far.link_delay(0)
        cleanup_instance()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.failover")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--datapaths", default="ebpf,nftables")
    ap.add_argument("--faults", default=",".join(FAULTS))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--wan-seconds", type=float, default=60.0)
    ap.add_argument("--wan-delay", type=float, default=0.08)
    a = ap.parse_args(argv)
    datapaths, faults = a.datapaths.split(","), a.faults.split(",")
    clear_stale(PREFIX)
    cleanup_instance()
    runs = []
    start = time.monotonic()
    with Testbed(n_backends=3, prefix=PREFIX) as tb:
        for rnd in range(a.rounds):
            for fault in faults:
                order = datapaths if rnd % 2 == 0 else list(reversed(datapaths))
                for dp in order:
                    r = one_run(tb, dp, fault, tb.tmpdir)
                    r["round"] = rnd
                    runs.append(r)
                    print(f"failover: round {rnd + 1}/{a.rounds} {fault:9} {dp:8} detect {r['detect_s']}s "
                          f"no-new {r['no_new_s']}s longest {r['longest_s']}s stream {r['stream_close_s']} "
                          f"rto {r.get('syn_rto_ms')} seen {r.get('kernel_seen_s')} "
                          f"failed {r['failed']}/{r['requests']}", file=sys.stderr, flush=True)
                    for f in r.get("failures", []):
                        print(f"failover:   failed request at {f['t0_s']}s: {f['first']} / retry: {f['retry']}",
                              file=sys.stderr, flush=True)
        wans = []
        if a.wan_seconds > 0:
            for dp in datapaths:
                w = wan_run(tb, dp, tb.tmpdir, a.wan_seconds, a.wan_delay)
                wans.append(w)
                print(f"failover: wan {dp:8} {w}", file=sys.stderr, flush=True)

    def med(vals):
        vals = [v for v in vals if isinstance(v, (int, float))]
        return f"{statistics.median(vals):.2f}" if vals else "-"

    def worst(vals):
        vals = [v for v in vals if isinstance(v, (int, float))]
        return f"{max(vals):.2f}" if vals else "-"

    print(f"\n`python -m bench.failover` — {a.rounds} rounds, default settings "
          f"(probe every 1 s, timeout 0.5 s, rise 2, fall 2, confirm 0.3 s), client ~150 new connections/s, "
          f"2 s timeout + 1 retry; {time.monotonic() - start:.0f} s total\n")
    print("| fault | data path | detect s (median / worst) | no new conns after s | longest request s | "
          "stream closed s after detect | failed requests |")
    print("|---|---|--:|--:|--:|--:|--:|")
    for fault in faults:
        for dp in datapaths:
            rs = [r for r in runs if r["fault"] == fault and r["datapath"] == dp]
            streams = [r["stream_close_s"] for r in rs]
            stream_txt = "kept open" if all(s == "kept" for s in streams) else (
                f"{med(streams)} / {worst(streams)}" if any(isinstance(s, float) for s in streams) else str(streams))
            print(f"| {fault} | {dp} | {med([r['detect_s'] for r in rs])} / {worst([r['detect_s'] for r in rs])} "
                  f"| {worst([r['no_new_s'] for r in rs])} | {worst([r['longest_s'] for r in rs])} | {stream_txt} "
                  f"| {sum(r['failed'] for r in rs)} of {sum(r['requests'] for r in rs)} |")
    if wans:
        print(f"\nA healthy backend {a.wan_delay * 1000:.0f} ms away (every packet its host sends delayed), "
              f"{a.wan_seconds:.0f} s of new connections through it:\n")
        print("| data path | measured latency ms | initial SYN RTO ms | kernel SYN timeouts seen | backend_down "
              "| longest request s | failed requests |")
        print("|---|--:|--:|--:|--:|--:|--:|")
        for w in wans:
            print(f"| {w['datapath']} | {w['latency_ms']} | {w['syn_rto_ms'] or 'kernel default (1000)'} "
                  f"| {w['passive_failures']} | {w['backend_down']} | {w['longest_s']:.2f} "
                  f"| {w['failed']} of {w['requests']} |")
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"failover-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(runs + wans, indent=1))
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
