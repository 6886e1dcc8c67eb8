"""`prism-kernel doctor`: can prism-kernel run on this node, and if not, why.

One line per check, each with a verdict and what to do:

  ok    nothing to do
  warn  prism-kernel runs, but something is degraded or needs attention
        (e.g. eBPF is missing, so `auto` falls back to nftables; or a listener
        holds the port and --take-over-listen-address says to take it over)
  fail  one of the reasons no data path can run here, or `run` would refuse
        (a listener already holds the port)

The checks (ids in `-o json`), in the order shown, and where they live:
  kernel              host.py       release (for the record: features are probed, not inferred)
  bpf.*, sock_diag.*  ebpf.py       each kernel feature the eBPF data path uses, probed
                                    (datapath/ebpf/features.py)
  cgroup              ebpf.py       the real cgroup v2 root (datapath/ebpf/cgroup.py)
  cgroup.exclusive    ebpf.py       no program holds connect4/6, getpeername4/6 or sock_ops at that
                                    root without BPF_F_ALLOW_MULTI (the kernel would refuse ours)
  bpffs               ebpf.py       /sys/fs/bpf mounted
  ebpf.loader         ebpf.py       which loader would load the programs (libbpf with the
                                    precompiled object, or the bcc fallback) and why
  nftables.module     host.py       python3-nftables / libnftables
  capabilities        host.py       CapEff: CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_BPF, CAP_PERFMON
  port                ports.py      listeners on 127.0.0.1:PORT / [::1]:PORT (Talos KubePrism):
                                    fail, as `run` refuses, unless --take-over-listen-address
  metrics_port        ports.py      the metrics port free, or the daemon's
  sysctls             host.py       net.ipv4.conf.all.route_localnet, net.ipv4.tcp_timestamps
  datapath.ebpf       datapaths.py  check_available, then the real programs loaded in a child
  datapath.nftables   datapaths.py  check_available (a kernel dry run)
  auto                datapaths.py  what `--datapath auto` chooses and why (datapath.choose)

Nothing here changes kernel state: BPF programs are loaded only to be freed
(never attached, never pinned), the nftables check is a dry run the kernel
never commits (it may autoload nf_tables modules, as any nft command does);
sysctls, mounts and listeners are only read.

Exit code: 0 when the daemon can run (`auto` finds a data path and nothing
listens on the port), 1 when not, 2 for a bad argument.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from typing import Any, TextIO

from prism_kernel.config import DEFAULT_PORT
from prism_kernel.observe.doctor import datapaths, ebpf, host, ports
from prism_kernel.observe.doctor.check import FAIL, OK, WARN, Check

SCHEMA = 1

_COLOURS = {OK: "\033[32m", WARN: "\033[33m", FAIL: "\033[31m"}
_RESET = "\033[0m"


def gather(port: int, instance: str, take_over: bool = False) -> dict[str, Any]:
    checks: list[Check] = [host.check_kernel()]
    checks += ebpf.check_bpf_features()
    checks += [ebpf.check_cgroup(), ebpf.check_exclusive(), ebpf.check_bpffs(), ebpf.check_loader(),
               host.check_nftables_module(), host.check_capabilities(), ports.check_port(port, instance, take_over),
               ports.check_metrics_port(instance), host.check_sysctls(),
               datapaths.check_datapath("ebpf", port, instance), datapaths.check_datapath("nftables", port, instance)]
    auto = datapaths.check_auto(port, instance)
    checks.append(auto)
    available = {c.id.split(".", 1)[1] for c in checks if c.id.startswith("datapath.") and c.verdict == OK}
    settle(checks, available)
    blocked = [c for c in checks if c.blocks_run and c.verdict == FAIL]
    can_run = auto.details.get("datapath") is not None and not blocked
    return {
        "schema": SCHEMA,
        "instance": instance,
        "port": port,
        "can_run": can_run,
        "datapath": auto.details.get("datapath"),
        "reason": auto.details.get("reason"),
        "blocked_by": [c.id for c in blocked],
        "checks": [asdict(c) for c in checks],
    }


def settle(checks: list[Check], available: set[str]) -> None:
    """A check that is not ok is `fail` only when it blocks a data path and no
    data path can run at all, or when it blocks `run` itself; otherwise `warn`
    (prism-kernel runs regardless)."""
    for c in checks:
        if c.verdict == OK or c.id == "auto":
            continue
        if c.blocks_run:
            c.verdict = FAIL
            continue
        c.verdict = FAIL if c.needed_by and not available else WARN


def render_text(report: dict[str, Any], out: TextIO, colour: bool) -> None:
    out.write(f"prism-kernel doctor: instance {report['instance']!r}, port {report['port']}\n")
    width = max(len(c["id"]) for c in report["checks"])
    for c in report["checks"]:
        verdict = c["verdict"]
        tag = f"{verdict:<4}"
        if colour:
            tag = f"{_COLOURS[verdict]}{tag}{_RESET}"
        line = f"{tag}  {c['id']:<{width}}  {c['summary']}"
        if c["action"] and verdict != OK:
            line += f". Do: {c['action']}"
        out.write(line + "\n")
    if report["can_run"]:
        out.write(f"result: prism-kernel can run here; --datapath auto would use {report['datapath']}\n")
    elif report.get("blocked_by"):
        out.write(f"result: `prism-kernel run` would refuse to start here ({', '.join(report['blocked_by'])}); "
                  f"--datapath auto would use {report['datapath']}\n")
    else:
        out.write("result: prism-kernel cannot run here (no data path available)\n")


def run_doctor(port: int, instance: str, output: str = "text", take_over: bool = False) -> int:
    """Entry point of `prism-kernel doctor`. Returns the exit code: 0 the
    daemon can run here, 1 it cannot (or `run` would refuse), 2 bad argument."""
    if not isinstance(port, int) or not 1 <= port <= 65535:
        print(f"prism-kernel doctor: --port must be 1..65535, not {port!r}", file=sys.stderr)
        return 2
    if output not in ("text", "json"):
        print(f"prism-kernel doctor: -o must be text or json, not {output!r}", file=sys.stderr)
        return 2
    report = gather(port, instance, take_over)
    if output == "json":
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        render_text(report, sys.stdout, colour)
    sys.stdout.flush()
    return 0 if report["can_run"] else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `prism-kernel doctor` (shared with `python -m prism_kernel.observe.doctor`)."""
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, metavar="PORT",
                        help=f"local port the daemon would use (default {DEFAULT_PORT})")
    parser.add_argument("--instance", default="prism-kernel", metavar="NAME",
                        help="instance name (default prism-kernel)")
    parser.add_argument("-o", "--output", choices=["text", "json"], default="text")
    parser.add_argument("--take-over-listen-address", action="store_true",
                        help="as `run --take-over-listen-address`: a listener on the port is a warning, not a failure")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prism-kernel doctor",
                                description="Check whether prism-kernel can run on this node, and why not.")
    add_arguments(p)
    args = p.parse_args(argv)
    return run_doctor(args.port, args.instance, args.output, args.take_over_listen_address)

