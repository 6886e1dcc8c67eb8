"""The demo: prism-kernel in front of three fake API servers.

Three hosts in network namespaces (198.18.N.2, addresses from the
benchmarking range, never routed off this machine) each serve a TLS fake
kube-apiserver. The daemon steers 127.0.0.1:PORT to them; the demo shows
`status`, sends requests, stops one server, shows the failover, and removes
everything it created. Needs a source checkout (the fake servers live in
tests/testbed) and root.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INSTANCE = "pk-demo"
PREFIX = "pkd"


def _say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"\n==> {text}", flush=True)


def _prism(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prism_kernel", *args], capture_output=True, text=True, cwd=REPO)


def _who(ctx: ssl.SSLContext, port: int) -> str:
    sys.path.insert(0, str(REPO))
    from tests.harness import https_get

    try:
        status, headers, _ = https_get(ctx, "/whoami", port=port)
        return headers.get("x-backend", f"http {status}")
    except OSError as e:
        return f"error: {e}"


def _active(port: int) -> set[str]:
    st = json.loads(_prism("status", "--instance", INSTANCE, "-o", "json").stdout)
    return set((st.get("state") or {}).get("active", []))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="prism-kernel demo")
    ap.add_argument("--port", type=int, default=7445)
    ap.add_argument("--datapath", default="auto", choices=["auto", "ebpf", "nftables"])
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("the demo needs root (network namespaces, nftables/BPF)", file=sys.stderr)
        return 1
    if not (REPO / "tests" / "testbed").is_dir():
        print("the demo runs from a source checkout (it uses tests/testbed)", file=sys.stderr)
        return 1
    sys.path.insert(0, str(REPO))
    from tests.testbed import Testbed, clear_stale

    clear_stale(PREFIX)
    _prism("cleanup", "--instance", INSTANCE, "--force")
    daemon = None
    with tempfile.TemporaryDirectory(prefix="prism-demo-") as tmp, Testbed(n_backends=3, prefix=PREFIX) as tb:
        try:
            endpoints = [b.endpoint for b in tb.backends]
            _say(f"three fake API servers on hosts in network namespaces: {', '.join(endpoints)}")
            argv = [sys.executable, "-m", "prism_kernel", "run", "--instance", INSTANCE, "--port", str(args.port),
                    "--datapath", args.datapath, "--ca-file", tb.ca_file, "--probe-interval", "500ms",
                    "--cleanup-on-exit", "--metrics-port", "0"]
            for e in endpoints:
                argv += ["--endpoint", e]
            _say("starting: " + " ".join(["prism-kernel", *argv[3:]]))
            log_path = Path(tmp) / "daemon.log"
            log = open(log_path, "w")
            daemon = subprocess.Popen(argv, stderr=log, stdout=subprocess.DEVNULL, cwd=REPO)
            deadline = time.monotonic() + 30
            while _active(args.port) != set(endpoints):
                if daemon.poll() is not None or time.monotonic() > deadline:
                    print(log_path.read_text(), file=sys.stderr)
                    return 1
                time.sleep(0.2)
            print(log_path.read_text(), end="")
            _say(f"prism-kernel status --instance {INSTANCE}")
            print(_prism("status", "--instance", INSTANCE).stdout, end="")

            ctx = ssl.create_default_context(cafile=tb.ca_file)
            _say(f"six new connections to https://127.0.0.1:{args.port}/whoami, spread by the kernel")
            print("  answered by: " + " ".join(_who(ctx, args.port) for _ in range(6)))

            victim = tb.backends[1]
            _say(f"stopping the API server on {victim.endpoint} (connections now refused)")
            mark = log_path.stat().st_size
            t0 = time.monotonic()
            victim.stop()
            # Timed to the stopped server's exit from the set (the survivors'
            # tiers may differ: then only the fastest stay in it).
            while victim.endpoint in _active(args.port) and time.monotonic() - t0 < 15:
                time.sleep(0.02)
            took = time.monotonic() - t0
            with open(log_path) as f:
                f.seek(mark)
                print(f.read(), end="")
            print(f"  failover: out of the set {took:.2f}s after the stop")
            _say(f"prism-kernel status --instance {INSTANCE}")
            print(_prism("status", "--instance", INSTANCE).stdout, end="")
            _say("six more connections: none reaches the stopped server")
            print("  answered by: " + " ".join(_who(ctx, args.port) for _ in range(6)))
        finally:
            if daemon is not None and daemon.poll() is None:
                _say("stopping the daemon (--cleanup-on-exit removes the data path) and the test hosts")
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(15)
                except subprocess.TimeoutExpired:
                    daemon.kill()
            _prism("cleanup", "--instance", INSTANCE, "--force")
    left = _prism("status", "--instance", INSTANCE, "-o", "json")
    kernel = json.loads(left.stdout)["kernel"] if left.stdout else {}
    installed = [k for k, v in kernel.items() if v.get("installed")]
    print("  kernel state left: " + (", ".join(installed) if installed else "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
