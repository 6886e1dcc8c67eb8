"""Benchmark: requests/s and p99 latency through each data path, against a
bare node, and the tax a data path puts on every other connection.

    python -m bench.run                                  # the default targets, ~6 min
    python -m bench.run --targets ebpf --modes close     # one data path, one mode
    python -m bench.run --targets nftables-naive         # the nftables path before its fix

One nginx backend (a static 3-byte response, so the server is cheap and the
path in between shows) in a network namespace. Two modes: keep-alive, and
one connection per request (`Connection: close`, i.e. connection churn:
connect + NAT setup + TIME_WAIT for every request).

A round measures every target in turn, in an order rotated every round:
`bare` (wrk to the backend's address, nothing of prism-kernel in the kernel),
then each target installed alone: wrk through it (steered) and, for the kernel
data paths, wrk to the backend's address while it is installed (bystander: the
tax every other connection of the node pays); then the target is removed
before the next one is installed. The result per target, mode and role is the
median over rounds, and the median of the per-round ratios to `bare` in the
same round (paired: drift between rounds cancels). Besides wrk's numbers
each run records SYN retransmits on the host, PAWS-rejected SYNs in the
backend's TIME_WAIT (namespace), conntrack drops, and the CPU time and RSS
of each target's own process (the daemon-side cost); with --bpf-stats, the
run time of each of our eBPF programs per call and calls per request.

Pinning (2 cores): by default wrk and nginx share CPU 0 ("same"): every
request's user and kernel work (both TCP stacks, veth, netfilter) runs on one
core, so the numbers are CPU cost per request and very stable (about ±1%);
with "split" (wrk CPU 0, nginx CPU 1) this VM's cross-CPU wakeups dominate
and vary ±20%.

Everything is created with the prefix "pkb" in 198.19.0.0/24 and removed at
exit, also on failure, Ctrl-C or SIGTERM; leftovers of an interrupted run are
removed at start. Markdown table on stdout, JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import env as benv
from bench.targets import DEFAULT_TARGETS, REFERENCES, TARGETS, Target

RESULTS = Path(__file__).resolve().parent / "results"
MODES = {"keepalive": [], "close": ["-H", "Connection: close"]}
_CLK = os.sysconf("SC_CLK_TCK")


# --- kernel counters ------------------------------------------------------------


def _snmp_pairs(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    lines = text.splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        prefix, _, names = names.partition(":")
        _, _, values = values.partition(":")
        for n, v in zip(names.split(), values.split()):
            try:
                out[f"{prefix}{n}"] = int(v)
            except ValueError:
                pass
    return out


def tcp_counters(ns: str | None = None) -> dict[str, int]:
    if ns is None:
        text = Path("/proc/net/netstat").read_text() + Path("/proc/net/snmp").read_text()
    else:
        text = benv.sh("cat", "/proc/net/netstat", "/proc/net/snmp", ns=ns).stdout
    return _snmp_pairs(text)


def conntrack_counters() -> dict[str, int]:
    try:
        lines = Path("/proc/net/stat/nf_conntrack").read_text().split("\n")
    except OSError:
        return {}
    names = lines[0].split()
    total = dict.fromkeys(names, 0)
    for line in lines[1:]:
        for n, v in zip(names, line.split()):
            total[n] += int(v, 16)
    total.pop("entries", None)
    return total


def proc_cost(pids: list[int]) -> tuple[float, float]:
    """(CPU seconds, RSS MiB) summed over live pids."""
    cpu, rss = 0.0, 0.0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            cpu += (int(fields[11]) + int(fields[12])) / _CLK
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) / 1024
        except (OSError, ValueError, IndexError):
            pass
    return cpu, rss


# --- wrk ------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def parse_wrk(out: str) -> dict[str, Any]:
    r: dict[str, Any] = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"wrk output without Requests/sec:\n{out}")
    r["rps"] = float(m.group(1))
    for pct, val, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M):
        r[f"p{pct}_ms"] = _ms(val, unit)
    m = re.search(r"(\d+) requests in", out)
    r["requests"] = int(m.group(1)) if m else None
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    r["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"),
                                  map(int, m.groups()))) if m else {}
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    r["non_2xx"] = int(m.group(1)) if m else 0
    return r


def run_wrk(url: str, mode: str, opts: argparse.Namespace, duration: float) -> dict[str, Any]:
    argv = ["wrk", "-t", str(opts.threads), "-c", str(opts.connections), "-d", f"{duration:g}s",
            "--latency", *MODES[mode], url]
    if opts.wrk_cpu is not None:
        argv = ["taskset", "-c", str(opts.wrk_cpu), *argv]
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    if cp.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {cp.stderr.strip() or cp.stdout.strip()}")
    return parse_wrk(cp.stdout)


# --- one measurement --------------------------------------------------------------


@dataclass
class Run:
    target: str
    role: str  # bare | steered (through the target) | bystander (direct, the target installed)
    mode: str
    round: int
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int
    syn_retrans: int
    paws_tw_rejected: int
    ct_drops: int
    cost_cpu_s: float
    cost_rss_mib: float
    duration_s: float
    wrk: dict[str, Any] = field(default_factory=dict)
    # --bpf-stats: "instance/hook" -> [ns per run, runs per request] of our programs
    bpf: dict[str, list[float]] = field(default_factory=dict)


def bpf_programs() -> dict[str, tuple[int, int]]:
    """"instance/hook" -> (run_time_ns, run_cnt) of every prism-kernel program
    attached through a pinned link under /sys/fs/bpf."""
    from prism_kernel.datapath.ebpf import bpfsys as bpf

    out: dict[str, tuple[int, int]] = {}
    for links in sorted(Path("/sys/fs/bpf").glob("*/links")):
        for pin in sorted(links.iterdir()):
            try:
                lfd = bpf.obj_get(str(pin))
            except OSError:
                continue
            try:
                pfd = bpf.prog_fd_by_id(bpf.link_info(lfd).prog_id)
                try:
                    out[f"{links.parent.name}/{pin.name}"] = bpf.prog_run_stats(pfd)
                finally:
                    os.close(pfd)
            except OSError:
                continue
            finally:
                os.close(lfd)
    return out


def measure(target: Target, role: str, url: str, mode: str, rnd: int, opts: argparse.Namespace) -> Run:
    pids = target.cost_pids()
    b0 = bpf_programs() if opts.bpf_stats else {}
    h0, n0, c0 = tcp_counters(), tcp_counters(benv.NETNS), conntrack_counters()
    cpu0, _ = proc_cost(pids)
    t0 = time.monotonic()
    w = run_wrk(url, mode, opts, opts.duration)
    elapsed = time.monotonic() - t0
    cpu1, rss = proc_cost(pids)
    h1, n1, c1 = tcp_counters(), tcp_counters(benv.NETNS), conntrack_counters()
    b1 = bpf_programs() if opts.bpf_stats else {}
    errs = sum(w["socket_errors"].values()) + w["non_2xx"]
    bpf_cost = {}
    for name, (ns1, cnt1) in b1.items():
        ns0, cnt0 = b0.get(name, (0, 0))
        if cnt1 > cnt0 and w.get("requests"):
            bpf_cost[name] = [round((ns1 - ns0) / (cnt1 - cnt0), 1), round((cnt1 - cnt0) / w["requests"], 2)]
    return Run(
        target=target.name, role=role, mode=mode, round=rnd, rps=w["rps"],
        p50_ms=w.get("p50_ms"), p99_ms=w.get("p99_ms"), errors=errs,
        syn_retrans=h1.get("TcpExtTCPSynRetrans", 0) - h0.get("TcpExtTCPSynRetrans", 0),
        paws_tw_rejected=n1.get("TcpExtPAWSTimewait", 0) - n0.get("TcpExtPAWSTimewait", 0),
        ct_drops=sum(c1.get(k, 0) - c0.get(k, 0) for k in ("drop", "early_drop", "insert_failed")),
        cost_cpu_s=round(cpu1 - cpu0, 3), cost_rss_mib=round(rss, 1),
        duration_s=round(elapsed, 2), wrk=w, bpf=bpf_cost,
    )


# --- summary ------------------------------------------------------------------


def _paired(runs: list[Run], base: dict[int, float]) -> float | None:
    ratios = [r.rps / base[r.round] for r in runs if base.get(r.round)]
    return round(statistics.median(ratios), 4) if ratios else None


def summarize(runs: list[Run], targets: list[str], modes: list[str]) -> list[dict[str, Any]]:
    rows = []
    for mode in modes:
        base = [r for r in runs if r.mode == mode and r.role == "bare"]
        base_rps = statistics.median(r.rps for r in base) if base else None
        base_p99 = statistics.median(r.p99_ms for r in base if r.p99_ms is not None) if base else None
        # Paired: each round's rate against bare's in the same round (seconds
        # apart), so drift between rounds cancels out.
        bare_in = {r.round: r.rps for r in base}
        for t in targets:
            rs = [r for r in runs if r.mode == mode and r.target == t and r.role in ("steered", "bare")]
            if not rs:
                continue
            by = [r for r in runs if r.mode == mode and r.target == t and r.role == "bystander"]
            rps = statistics.median(r.rps for r in rs)
            p99s = [r.p99_ms for r in rs if r.p99_ms is not None]
            p99 = statistics.median(p99s) if p99s else None
            secs = sum(r.duration_s for r in rs) or 1
            rows.append({
                "mode": mode, "target": t, "rounds": len(rs),
                "rps_median": round(rps, 1), "rps_min": round(min(r.rps for r in rs), 1),
                "rps_max": round(max(r.rps for r in rs), 1),
                "rps_vs_bare": round(rps / base_rps, 4) if base_rps else None,
                "rps_vs_bare_paired": _paired(rs, bare_in),
                "bystander_rps_median": round(statistics.median(r.rps for r in by), 1) if by else None,
                "bystander_vs_bare_paired": _paired(by, bare_in),
                "p99_ms_median": round(p99, 3) if p99 is not None else None,
                "p99_vs_bare": round(p99 / base_p99, 3) if (p99 and base_p99) else None,
                "syn_retrans_per_s": round(sum(r.syn_retrans for r in rs) / secs, 1),
                "paws_tw_rejected_per_s": round(sum(r.paws_tw_rejected for r in rs) / secs, 1),
                "errors": sum(r.errors for r in rs + by),
                "ct_drops": sum(r.ct_drops for r in rs + by),
                "cost_cpu_s": round(sum(r.cost_cpu_s for r in rs), 3),
                "cost_rss_mib": max(r.cost_rss_mib for r in rs),
            })
    return rows


def references(runs: list[Run], targets: list[str], modes: list[str]) -> list[dict[str, Any]]:
    """Steered A / steered B paired per round, for the REFERENCES pairs that
    were both measured (e.g. nftables against the floor of NAT cost)."""
    out = []
    for mode in modes:
        for (a, arole), (b, brole) in REFERENCES:
            if a not in targets or b not in targets:
                continue
            bs = {r.round: r.rps for r in runs if r.mode == mode and r.target == b and r.role == brole}
            ra = [r for r in runs if r.mode == mode and r.target == a and r.role == arole]
            out.append({"mode": mode, "target": f"{a} {arole}", "reference": f"{b} {brole}",
                        "paired": _paired(ra, bs)})
    return out


def markdown(rows: list[dict[str, Any]], refs: list[dict[str, Any]], opts: argparse.Namespace) -> str:
    def f(v: Any, fmt: str = "{}") -> str:
        return "-" if v is None else fmt.format(v)

    head = ("| mode | target | req/s (median, min–max) | ÷ bare (per round) | bystander ÷ bare (per round) "
            "| p99 ms | p99 ÷ bare | SYN rtx/s | PAWS TW rej/s | errors | own CPU s | own RSS MiB |")
    out = [head, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        out.append(
            f"| {r['mode']} | {r['target']} | {r['rps_median']:,.0f} "
            f"({r['rps_min']:,.0f}–{r['rps_max']:,.0f}) | {f(r['rps_vs_bare_paired'], '{:.3f}')} "
            f"| {f(r['bystander_vs_bare_paired'], '{:.3f}')} "
            f"| {f(r['p99_ms_median'], '{:.2f}')} | {f(r['p99_vs_bare'], '{:.2f}')} "
            f"| {r['syn_retrans_per_s']:g} | {r['paws_tw_rejected_per_s']:g} | {r['errors']} "
            f"| {f(r['cost_cpu_s'] if r['target'] != 'bare' else None, '{:.2f}')} "
            f"| {f(r['cost_rss_mib'] or None, '{:.0f}')} |")
    for ref in refs:
        out.append(f"\n{ref['mode']}: {ref['target']} ÷ {ref['reference']} (per round): "
                   f"{f(ref['paired'], '{:.3f}')}")
    return "\n".join(out)


def bpf_markdown(runs: list[Run], opts: argparse.Namespace) -> str:
    out = ["| mode | target | role | program (instance/hook) | ns per run | runs per request | ns per request |",
           "|---|---|---|---|--:|--:|--:|"]
    for mode in opts.mode_names:
        for t in opts.target_names:
            for role in ("steered", "bystander"):
                rs = [r for r in runs if r.mode == mode and r.target == t and r.role == role]
                for name in sorted({n for r in rs for n in r.bpf}):
                    vals = [r.bpf[name] for r in rs if name in r.bpf]
                    ns = statistics.median(v[0] for v in vals)
                    per = statistics.median(v[1] for v in vals)
                    out.append(f"| {mode} | {t} | {role} | {name} | {ns:.0f} | {per:.2f} | {ns * per:.0f} |")
    return "\n".join(out)


# --- main -----------------------------------------------------------------------


def host_info() -> dict[str, Any]:
    def sysctl(name: str) -> str | None:
        try:
            return " ".join(Path("/proc/sys", *name.split(".")).read_text().split())
        except OSError:
            return None

    wrk_v = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.splitlines()
    return {
        "kernel": platform.release(), "cpus": os.cpu_count(),
        "wrk": (wrk_v or ["?"])[0], "python": platform.python_version(),
        "sysctl": {n: sysctl(n) for n in (
            "net.ipv4.tcp_timestamps", "net.ipv4.ip_local_port_range", "net.ipv4.tcp_tw_reuse",
            "net.ipv4.tcp_congestion_control", "net.netfilter.nf_conntrack_tcp_timeout_time_wait",
            "net.ipv4.conf.all.route_localnet")},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                    help=f"comma list of {', '.join(TARGETS)} (default %(default)s); "
                         f"'bare' is always measured as the baseline")
    ap.add_argument("--modes", default="keepalive,close", help="comma list of keepalive, close")
    ap.add_argument("--rounds", type=int, default=9, help="alternating rounds (default 9: a single round varies by about 1%%)")
    ap.add_argument("--duration", type=int, default=2, help="seconds per wrk run (wrk takes whole seconds)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="seconds of unrecorded load per target and mode in round 1, before its measurement")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pin", choices=("same", "split", "none"), default="same",
                    help="same: wrk and nginx on CPU 0; split: wrk CPU 0, nginx CPU 1; none")
    ap.add_argument("--port", type=int, default=27445, help="listen port of the first data path target")
    ap.add_argument("--instance", default=f"{benv.PREFIX}-bench",
                    help="instance name (nft table) of the data path targets")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--bpf-stats", action="store_true",
                    help="also measure each eBPF program's run time per call and calls per request "
                         "(BPF_ENABLE_STATS, for the run only)")
    opts = ap.parse_args(argv)
    names = [t.strip() for t in opts.targets.split(",") if t.strip()]
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        ap.error(f"unknown target(s) {unknown}; known: {', '.join(TARGETS)}")
    if "bare" not in names:
        names.insert(0, "bare")
    opts.target_names = list(dict.fromkeys(names))
    opts.mode_names = [m.strip() for m in opts.modes.split(",") if m.strip()]
    if not opts.mode_names or any(m not in MODES for m in opts.mode_names):
        ap.error(f"--modes: choose from {', '.join(MODES)}")
    if opts.rounds < 1 or opts.duration < 1 or opts.warmup < 0:
        ap.error("--rounds >= 1, --duration >= 1, --warmup >= 0")
    if not 1 <= opts.threads <= opts.connections:
        ap.error("need 1 <= --threads <= --connections")
    cpus = os.cpu_count() or 1
    opts.wrk_cpu = None if opts.pin == "none" else 0
    opts.nginx_cpu = {"same": 0, "split": 1 if cpus > 1 else 0, "none": None}[opts.pin]
    return opts


def _on_sigterm(signum, frame):  # run the finally blocks, like Ctrl-C
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: run as root (network namespaces, nftables)", file=sys.stderr)
        return 2
    for tool in ("wrk", "nginx", "taskset", "ip"):
        if not shutil.which(tool):
            print(f"bench: {tool} not found (packaging/dev.sh setup installs it)", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    started = time.time()
    targets: list[Target] = [TARGETS[n]() for n in opts.target_names]
    # Leftovers of an interrupted run: test hosts, then each target's kernel state.
    for line in benv.clear_leftovers():
        print(f"bench: removed leftover {line}", file=sys.stderr)
    # Every target's, not only this run's: a leftover of another target
    # (an nft table, empty cgroup programs) would tax this run's bare.
    for cls in TARGETS.values():
        for line in cls.clear_leftovers(opts):
            print(f"bench: removed leftover: {line}", file=sys.stderr)

    runs: list[Run] = []
    urls: dict[str, str] = {}
    stats_fd = None
    if opts.bpf_stats:
        from prism_kernel.datapath.ebpf import bpfsys as _bpfsys

        stats_fd = _bpfsys.enable_run_time_stats()  # off again when this process ends
    info = host_info()
    with benv.Env(nginx_cpu=opts.nginx_cpu) as e:
        current: Target | None = None
        try:
            for rnd in range(opts.rounds):
                order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
                for t in order:
                    # One target in the kernel at a time: installed here, removed
                    # below, so `bare` and every bystander see only their own state.
                    current = t
                    addr, port = e.fresh_backend()
                    direct_url = f"http://{addr}:{port}/"
                    url = urls[t.name] = t.setup(e, opts)
                    roles = [("bare" if t.name == "bare" else "steered", url)]
                    if t.bystander:
                        roles.append(("bystander", direct_url))
                    for mode in opts.mode_names:
                        for role, u in roles:
                            if rnd == 0 and opts.warmup > 0:
                                run_wrk(u, mode, opts, opts.warmup)
                            r = measure(t, role, u, mode, rnd, opts)
                            runs.append(r)
                            print(f"bench: round {rnd + 1}/{opts.rounds} {mode:9} {t.name:16} {role:9} "
                                  f"{r.rps:10,.0f} req/s  p99 {r.p99_ms or 0:7.2f} ms  "
                                  f"syn-rtx {r.syn_retrans}", file=sys.stderr, flush=True)
                    current = None
                    t.teardown()
        finally:
            if current is not None:
                try:
                    current.teardown()
                except Exception as ex:  # the leftovers pass below still runs
                    print(f"bench: teardown of {current.name} failed: {ex}", file=sys.stderr)
            for t in targets:
                try:
                    type(t).clear_leftovers(opts)
                except Exception as ex:  # keep clearing the others
                    print(f"bench: clearing {t.name} failed: {ex}", file=sys.stderr)
            if stats_fd is not None:
                os.close(stats_fd)

    rows = summarize(runs, opts.target_names, opts.mode_names)
    refs = references(runs, opts.target_names, opts.mode_names)
    bpf_table = bpf_markdown(runs, opts) if opts.bpf_stats else ""
    cmd = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    table = markdown(rows, refs, opts)
    print(f"\n`{cmd.strip()}` — {opts.rounds} rounds × {opts.duration:g} s, wrk -t{opts.threads} "
          f"-c{opts.connections}, pin={opts.pin}, kernel {info['kernel']}, "
          f"{time.time() - started:.0f} s total\n")
    print(table)
    if bpf_table:
        print("\neBPF programs (medians over rounds; only the measured target is installed):\n")
        print(bpf_table)
    opts.out.mkdir(parents=True, exist_ok=True)
    path = opts.out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({
        "command": cmd.strip(), "started": started, "seconds": round(time.time() - started, 1),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "host": info, "urls": urls, "summary": rows, "references": refs, "runs": [asdict(r) for r in runs],
    }, indent=2))
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; cleaned up", file=sys.stderr)
        sys.exit(130)
