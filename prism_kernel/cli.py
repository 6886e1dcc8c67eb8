"""Command line: `prism-kernel run | status | doctor | cleanup`.

Exit codes: 0 ok; 1 runtime failure (or, for status, no healthy backend);
2 invalid configuration or flags (nothing in the kernel touched); 3 another
daemon holds the lock.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from pathlib import Path
from typing import Any

from prism_kernel import __version__
from prism_kernel.config import DEFAULT_PORT, INSTANCE_PATTERN, build_config, load_yaml
from prism_kernel.errors import ConfigError, PrismError
from prism_kernel.log import EventLog, route_logging


def _instance(value: str) -> str:
    """Instance names become paths (/run/<instance>, /sys/fs/bpf/<instance>)
    and table names: the same rule as the configuration's."""
    if not re.fullmatch(INSTANCE_PATTERN, value):
        raise argparse.ArgumentTypeError(
            f"{value!r}: an instance name is 1-31 characters of a-z, 0-9 and '-', starting with a letter")
    return value


def _port(value: str) -> int:
    """A TCP port as typed: ASCII digits only (int() also reads '١٢' and
    ' 12'), 1-65535."""
    if not re.fullmatch(r"[0-9]{1,5}", value) or not 1 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r}: a port is a whole number 1-65535")
    return int(value)


def _watch_seconds(value: str) -> float:
    """--watch: seconds, finite and positive (float() also reads 'nan' and 'inf')."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds <= 3600:  # also false for NaN
        raise argparse.ArgumentTypeError(f"{value!r}: the interval is seconds, more than 0 and at most 3600")
    return seconds


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prism-kernel",
        description="A highly available Kubernetes API endpoint at 127.0.0.1:7445, steered by the kernel.",
    )
    p.add_argument("--version", action="version", version=f"prism-kernel {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon: probe the endpoints, steer 127.0.0.1:PORT to the healthy ones")
    run.add_argument("--config", metavar="FILE", help="YAML configuration file (flags override it)")
    run.add_argument("--endpoint", dest="endpoints", action="extend", nargs="+", metavar="HOST:PORT",
                     help="API server endpoint; repeatable; replaces the file's list")
    run.add_argument("--port", metavar="PORT", help="local port (default 7445)")
    run.add_argument("--discovery", dest="discovery_enabled", action="store_true", default=None,
                     help="also steer to the API servers of the `kubernetes` Service's EndpointSlices")
    run.add_argument("--kubeconfig", metavar="FILE",
                     help="kubeconfig for discovery (default /etc/kubernetes/kubelet.conf)")
    run.add_argument("--datapath", metavar="auto|ebpf|nftables", help="kernel data path (default auto)")
    run.add_argument("--ebpf-loader", metavar="auto|libbpf|bcc",
                     help="how the eBPF programs are loaded (default auto: the precompiled object with libbpf)")
    run.add_argument("--probe", dest="probe_mode", metavar="tcp|tls|readyz", help="probe mode (default readyz)")
    run.add_argument("--probe-interval", metavar="S", help="seconds between probes, or 500ms (default 1s)")
    run.add_argument("--probe-timeout", metavar="S", help="seconds a probe may take (default 500ms)")
    run.add_argument("--probe-rise", metavar="N", help="successes to come up (default 2)")
    run.add_argument("--probe-fall", metavar="N", help="failures to go down (default 2)")
    run.add_argument("--confirm-timeout", metavar="S", help="timeout of the handshake confirming a fatal-looking failure (default 300ms)")
    run.add_argument("--ca-file", metavar="FILE", help="CA bundle that signs the API server certificates")
    run.add_argument("--client-cert", metavar="FILE", help="client certificate for /readyz (PEM)")
    run.add_argument("--client-key", metavar="FILE", help="client key for /readyz (PEM)")
    run.add_argument("--tls-server-name", metavar="NAME", help="name to verify in the server certificate")
    run.add_argument("--insecure-skip-verify", action="store_true", default=None,
                     help="do not verify the server certificate")
    run.add_argument("--cleanup-on-exit", action="store_true", default=None,
                     help="remove the data path when stopping (default: leave it steering)")
    run.add_argument("--take-over-listen-address", action="store_true", default=None,
                     help="start even when a process listens on 127.0.0.1:PORT / [::1]:PORT, and steer "
                          "that address away from it (e.g. instead of KubePrism); default: refuse, exit 2")
    run.add_argument("--instance", type=_instance, metavar="NAME", help="name of the kernel state (default prism-kernel)")
    run.add_argument("--log-format", metavar="logfmt|json", help="log line format (default logfmt)")
    run.add_argument("--metrics-address", metavar="IP",
                     help="address of /metrics, /healthz, /readyz (default 127.0.0.1)")
    run.add_argument("--metrics-port", metavar="PORT", help="port of the metrics server (default 7450)")
    run.add_argument("--no-metrics", dest="metrics_enabled", action="store_false", default=None,
                     help="serve no /metrics, /healthz, /readyz")

    st = sub.add_parser("status", help="show health, the active set and what the kernel holds")
    st.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    st.add_argument("-w", "--watch", nargs="?", const=2.0, type=_watch_seconds, metavar="S",
                    help="repeat every S seconds (default 2) until interrupted")
    st.add_argument("--instance", type=_instance, default="prism-kernel", metavar="NAME")
    st.add_argument("--run-dir", metavar="DIR", help="the daemon's run directory, when its config sets one (default /run/NAME)")

    dr = sub.add_parser("doctor", help="check this node: kernel features, capabilities, port; which data path auto would use")
    dr.add_argument("--port", type=_port, default=DEFAULT_PORT, metavar="PORT", help="local port the daemon would use (default 7445)")
    dr.add_argument("--instance", type=_instance, default="prism-kernel", metavar="NAME")
    dr.add_argument("-o", "--output", choices=["text", "json"], default="text")
    dr.add_argument("--take-over-listen-address", action="store_true",
                    help="as run's flag: a listener on the port is a warning, not a failure")

    cl = sub.add_parser("cleanup", help="remove everything the daemon created in the kernel and restore sysctls")
    cl.add_argument("--instance", type=_instance, default="prism-kernel", metavar="NAME")
    cl.add_argument("--run-dir", metavar="DIR", help="the daemon's run directory, when its config sets one (default /run/NAME)")
    cl.add_argument("--force", action="store_true", help="even while a daemon runs (it will re-create its state)")
    return p


def config_from_args(args: argparse.Namespace):
    """The configuration of `run`: the file, then the flags as typed (text;
    config.build_config reads each by its field's type). Called again on
    SIGHUP, so a reload passes exactly the checks a start does."""
    file_data: dict[str, Any] = load_yaml(args.config) if args.config else {}
    flags = {
        "endpoints": args.endpoints,
        "port": args.port,
        "datapath": args.datapath,
        "ebpf": {"loader": args.ebpf_loader},
        "cleanup_on_exit": args.cleanup_on_exit,
        "take_over_listen_address": args.take_over_listen_address,
        "instance": args.instance,
        "log_format": args.log_format,
        "discovery": {
            "enabled": args.discovery_enabled,
            "kubeconfig": args.kubeconfig,
        },
        "metrics": {
            "enabled": args.metrics_enabled,
            "address": args.metrics_address,
            "port": args.metrics_port,
        },
        "probe": {
            "mode": args.probe_mode,
            "interval": args.probe_interval,
            "timeout": args.probe_timeout,
            "rise": args.probe_rise,
            "fall": args.probe_fall,
            "confirm_timeout": args.confirm_timeout,
            "ca_file": args.ca_file,
            "client_cert_file": args.client_cert,
            "client_key_file": args.client_key,
            "server_name": args.tls_server_name,
            "insecure_skip_verify": args.insecure_skip_verify,
        },
    }
    return build_config(file_data, flags)


def _run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    from prism_kernel.control.supervisor import Daemon  # after validation: nothing heavy for a bad flag

    log = EventLog(config.log_format)
    route_logging(log)
    try:
        return asyncio.run(Daemon(config, log, reload_config=lambda: config_from_args(args)).run())
    except PrismError as e:
        log.error("fatal", error=str(e))
        return e.exit_code


def _cleanup(args: argparse.Namespace) -> int:
    from prism_kernel.control.runstate import RUN_FILES, STATE_FILE, daemon_pid
    from prism_kernel.datapath import ALL, DatapathSettings, datapath_class
    from prism_kernel.errors import DatapathUnavailable

    run_dir = Path(args.run_dir or f"/run/{args.instance}")
    pid = daemon_pid(run_dir)
    if pid and not args.force:
        print(f"prism-kernel cleanup: a daemon (pid {pid}) is running for instance {args.instance!r}; "
              "stop it first (or --force)", file=sys.stderr)
        return 1
    settings = DatapathSettings(instance=args.instance)
    removed: list[str] = []
    failed = False
    for name in ALL:
        try:
            removed += datapath_class(name).cleanup(settings)
        except DatapathUnavailable:
            continue  # that data path cannot exist here, so there is nothing to remove
        except PrismError as e:
            print(f"prism-kernel cleanup: {name}: {e}", file=sys.stderr)
            failed = True
    # Only the files the daemon writes, and not the sysctl backup when a data
    # path could not be cleaned (it still holds the values to restore).
    if run_dir.is_dir() and not pid and not failed:
        for f in sorted(run_dir.iterdir()):
            if f.name in RUN_FILES or f.name.startswith(f".{STATE_FILE}."):
                f.unlink(missing_ok=True)
        try:
            run_dir.rmdir()
            removed.append(f"run directory {run_dir}")
        except OSError:
            print(f"prism-kernel cleanup: left {run_dir}: it holds files prism-kernel did not write",
                  file=sys.stderr)
    for line in removed:
        print(f"removed {line}")
    if not removed:
        print(f"nothing to remove for instance {args.instance!r}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except BrokenPipeError:
        # `prism-kernel status | head`: the reader left; not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _dispatch(args: argparse.Namespace) -> int:
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "status":
            from prism_kernel.observe.status import run_status

            return run_status(args.instance, Path(args.run_dir or f"/run/{args.instance}"), args.output,
                              watch=args.watch)
        if args.command == "cleanup":
            return _cleanup(args)
        if args.command == "doctor":
            from prism_kernel.observe.doctor import run_doctor

            return run_doctor(args.port, args.instance, args.output, args.take_over_listen_address)
    except ConfigError as e:
        print(f"prism-kernel: {e}", file=sys.stderr)
        return e.exit_code
    except PrismError as e:
        print(f"prism-kernel: {e}", file=sys.stderr)
        return e.exit_code
    return 2


if __name__ == "__main__":
    sys.exit(main())
