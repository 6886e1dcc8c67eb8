"""What the benchmark measures: a target = setup/teardown + the URL wrk loads.

Adding one (the eBPF path, HAProxy in TCP mode as a userspace reference) is a
subclass with `name`, `setup()` returning the URL, `teardown()`, and, when a
process does work for the target, `cost_pids()` so the run reports its CPU
time and RSS; then one line in TARGETS. Example:

    class Haproxy(Target):
        name = "haproxy"
        def setup(self, env, opts):
            self.proc = subprocess.Popen(["haproxy", "-f", cfg_for(env.backend, opts.port)])
            return f"http://127.0.0.1:{opts.port}/"
        def teardown(self):
            self.proc.terminate(); self.proc.wait()
        def cost_pids(self):
            return [self.proc.pid]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.env import Env

REPO = Path(__file__).resolve().parents[1]


class Target:
    name = "?"
    description = ""
    # Kernel data paths tax every other connection of the node while they are
    # installed (cgroup programs, nft hooks): the benchmark then also measures a
    # direct connection to the backend ("bystander").
    bystander = False

    def setup(self, env: Env, opts: Any) -> str:
        """Make the target ready; return the URL wrk should load."""
        raise NotImplementedError

    def teardown(self) -> None:
        """Undo setup(); must work after a partial setup and twice."""

    def cost_pids(self) -> list[int]:
        """Processes whose CPU time and RSS count as this target's own cost."""
        return []

    @classmethod
    def clear_leftovers(cls, opts: Any) -> list[str]:
        """Remove kernel state an interrupted earlier run of this target left."""
        return []


class Bare(Target):
    """The baseline: wrk to the backend's address with nothing of prism-kernel
    in the kernel (every other target is removed while it runs)."""

    name = "bare"
    description = "wrk -> backend address, nothing of prism-kernel installed"

    def setup(self, env: Env, opts: Any) -> str:
        addr, port = env.backend
        return f"http://{addr}:{port}/"


class Nftables(Target):
    """The nftables data path, installed by a separate holder process (as the
    daemon would) that then idles: its CPU time and RSS are the daemon-side
    cost; the data path itself runs in the kernel."""

    name = "nftables"
    datapath = "nftables"
    description = "wrk -> 127.0.0.1:PORT, nftables DNAT (prism_kernel.datapath.nft.datapath)"
    naive = False
    loader: str | None = None  # eBPF: ebpf.loader for the holder
    # Each target has its own listen port and instance (table), so that a
    # leftover of one never changes another's measurement.
    port_offset = 0
    instance_suffix = ""
    bystander = True

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.opts: Any = None

    @classmethod
    def _settings(cls, opts: Any) -> tuple[int, str]:
        return opts.port + cls.port_offset, opts.instance + cls.instance_suffix

    def setup(self, env: Env, opts: Any) -> str:
        self.opts = opts
        addr, port = env.backend
        listen, instance = self._settings(opts)
        argv = [sys.executable, "-m", "bench.holder", "--datapath", self.datapath,
                "--instance", instance, "--port", str(listen),
                "--backend", f"{addr}:{port}"]
        if self.naive:
            argv.append("--naive")
        if self.loader:
            argv += ["--ebpf-loader", self.loader]
        self.proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            err = self.proc.stderr.read() if self.proc.stderr else ""
            self.teardown()
            raise RuntimeError(f"{self.name} holder failed: {line} {err.strip()}")
        return f"http://127.0.0.1:{listen}/"

    def teardown(self) -> None:
        if self.proc is not None:
            try:
                if self.proc.stdin:
                    self.proc.stdin.close()  # holder exits; the kernel state stays
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self.opts is not None:
            self.clear_leftovers(self.opts)

    def cost_pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    @classmethod
    def clear_leftovers(cls, opts: Any) -> list[str]:
        from prism_kernel.datapath import datapath_class
        from prism_kernel.datapath.base import DatapathSettings

        listen, instance = cls._settings(opts)
        return datapath_class(cls.datapath).cleanup(DatapathSettings(listen_port=listen, instance=instance))


class NftablesNaive(Nftables):
    """The same table without the tcp_timestamps fix: the data path before the
    fix, kept to reproduce the problem (nft/README.md)."""

    name = "nftables-naive"
    description = "as nftables, but net.ipv4.tcp_timestamps left at 1 (before the fix)"
    naive = True
    port_offset = 1
    instance_suffix = "-naive"


class Ebpf(Nftables):
    """The eBPF data path: a cgroup connect4 program rewrites the connect()
    to the backend before any packet exists; no per-packet work at all."""

    name = "ebpf"
    datapath = "ebpf"
    description = "wrk -> 127.0.0.1:PORT, cgroup connect4 rewrite (prism_kernel.datapath.ebpf.datapath)"
    port_offset = 2
    instance_suffix = "-ebpf"
    loader = "libbpf"


class EbpfBcc(Ebpf):
    """The same programs compiled by bcc at run time (the fallback loader):
    the precompiled object must be at least as fast."""

    name = "ebpf-bcc"
    description = "as ebpf, the programs compiled by bcc at run time (ebpf.loader: bcc)"
    port_offset = 5
    instance_suffix = "-ebpf-bcc"
    loader = "bcc"


class EbpfHooks(Target):
    """The floor of any cgroup-BPF data path: the same five hooks at the
    cgroup v2 root (connect4/6, getpeername4/6, sock_ops), each a program that
    returns at once (bench/bpf/hooks_only.bpf.c, built with clang and attached
    with bpftool). Its bystander figure is what the kernel charges every
    connection for the hooks being enabled, before any of our code runs; the
    real programs are measured against it. It steers nothing: its steered
    figure would be a refused connect, so only the bystander is measured."""

    name = "ebpf-hooks"
    description = "wrk -> backend address, the five cgroup hooks attached with programs that return at once"
    bystander = False  # its own measurement is the direct connection
    pin_dir = "/sys/fs/bpf/pkb-hooks"
    hooks = (("connect4", "connect4"), ("connect6", "connect6"), ("getpeername4", "getpeername4"),
             ("getpeername6", "getpeername6"), ("sock_ops", "pk_sockops"))

    def __init__(self) -> None:
        self.opts: Any = None

    @staticmethod
    def _root() -> str:
        from prism_kernel.datapath.ebpf.cgroup import find_cgroup2_root

        return find_cgroup2_root()

    def setup(self, env: Env, opts: Any) -> str:
        import tempfile

        self.opts = opts
        self.clear_leftovers(opts)
        with tempfile.TemporaryDirectory(prefix="pkb-hooks-") as tmp:
            obj = Path(tmp) / "hooks_only.bpf.o"
            subprocess.run(["bash", str(REPO / "bpf" / "build.sh"), str(obj),
                            str(REPO / "bench" / "bpf" / "hooks_only.bpf.c")],
                           check=True, capture_output=True, text=True)
            subprocess.run(["bpftool", "prog", "loadall", str(obj), self.pin_dir],
                           check=True, capture_output=True, text=True)
        root = self._root()
        for hook, prog in self.hooks:
            subprocess.run(["bpftool", "cgroup", "attach", root, hook, "pinned",
                            f"{self.pin_dir}/{prog}", "multi"], check=True, capture_output=True, text=True)
        addr, port = env.backend
        return f"http://{addr}:{port}/"

    def teardown(self) -> None:
        if self.opts is not None:
            self.clear_leftovers(self.opts)

    @classmethod
    def clear_leftovers(cls, opts: Any) -> list[str]:
        """Every hook of the object is detached, whichever variant attached
        it (they share the pins); the pins go only once none of their
        programs is attached any more (a pin is the only handle on them)."""
        import json

        if not Path(cls.pin_dir).exists():
            return []
        root = cls._root()
        pinned: dict[str, int] = {}
        for _, prog in EbpfHooks.hooks:
            r = subprocess.run(["bpftool", "-j", "prog", "show", "pinned", f"{cls.pin_dir}/{prog}"],
                               capture_output=True, text=True)
            if r.returncode == 0:
                pinned[prog] = json.loads(r.stdout)["id"]
        for hook, prog in EbpfHooks.hooks:
            if prog in pinned:  # fails harmlessly when that variant did not attach it
                subprocess.run(["bpftool", "cgroup", "detach", root, hook, "pinned", f"{cls.pin_dir}/{prog}"],
                               capture_output=True)
        r = subprocess.run(["bpftool", "-j", "cgroup", "show", root], capture_output=True, text=True, check=True)
        # bpftool -j prints a bare newline, not [], when nothing is attached
        still = {a["id"] for a in json.loads(r.stdout.strip() or "[]")} & set(pinned.values())
        if still:
            raise RuntimeError(f"{cls.pin_dir}: programs {sorted(still)} still attached at {root}; pins kept")
        shutil.rmtree(cls.pin_dir, ignore_errors=True)
        return [f"{cls.pin_dir}: detached and removed"]


class EbpfHooksSockops(EbpfHooks):
    """ebpf-hooks with only the sock_ops hook: it runs about nine times per
    connection (both ends), the four sock_addr hooks once or not at all."""

    name = "ebpf-hooks-sockops"
    description = "wrk -> backend address, only the sock_ops hook attached, its program returns at once"
    hooks = (("sock_ops", "pk_sockops"),)


class EbpfHooksSockAddr(EbpfHooks):
    """ebpf-hooks without sock_ops: connect4/6 and getpeername4/6 only, what a
    connect()-rewrite without passive detection and SYN RTO would attach."""

    name = "ebpf-hooks-sockaddr"
    description = "wrk -> backend address, only the four sock_addr hooks attached, programs return at once"
    hooks = EbpfHooks.hooks[:4]


class NftablesMinimal(Target):
    """The least a DNAT data path can do: one dnat rule to the one backend and
    one masquerade rule; no map, no random draw, no counters, no CVE-2020-8558
    guard, no refused detection. Not a product (it must not be deployed: the
    guard is missing); the ceiling any nftables ruleset of this design can
    reach on this kernel, measured beside the real one. Same sysctls as the
    data path (route_localnet=1, tcp_timestamps=2), saved and restored with
    prism_kernel.datapath.sysctl under its own instance name."""

    name = "nftables-minimal"
    description = "wrk -> 127.0.0.1:PORT, one nft dnat rule + one masquerade rule (the floor of NAT cost)"
    port_offset = 4
    bystander = True
    table = "pkb_min"
    instance = "pkb-min"
    sysctls = (("net.ipv4.conf.all.route_localnet", "1"), ("net.ipv4.tcp_timestamps", "2"))

    def __init__(self) -> None:
        self.opts: Any = None

    @staticmethod
    def _nft(cmds: list[dict]) -> None:
        import nftables

        nft = nftables.Nftables()
        nft.set_json_output(True)
        rc, _, err = nft.json_cmd({"nftables": cmds})
        if rc != 0:
            raise RuntimeError(f"nft: {err.strip()}")

    def setup(self, env: Env, opts: Any) -> str:
        from prism_kernel.datapath import sysctl

        self.opts = opts
        addr, port = env.backend
        listen = opts.port + self.port_offset
        t = {"family": "ip", "table": self.table}
        for name, value in self.sysctls:
            sysctl.ensure(self.instance, name, value)
        self._nft([
            {"add": {"table": {"family": "ip", "name": self.table}}},
            {"add": {"chain": {**t, "name": "out", "type": "nat", "hook": "output",
                               "prio": -100, "policy": "accept"}}},
            {"add": {"chain": {**t, "name": "post", "type": "nat", "hook": "postrouting",
                               "prio": 100, "policy": "accept"}}},
            {"add": {"rule": {**t, "chain": "out", "expr": [
                {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                           "right": "127.0.0.1"}},
                {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                           "right": listen}},
                {"dnat": {"addr": addr, "port": port}}]}}},
            {"add": {"rule": {**t, "chain": "post", "expr": [
                {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}},
                {"match": {"op": "==", "left": {"ct": {"key": "ip daddr", "dir": "original"}},
                           "right": "127.0.0.1"}},
                {"masquerade": None}]}}},
        ])
        return f"http://127.0.0.1:{listen}/"

    def teardown(self) -> None:
        if self.opts is not None:
            self.clear_leftovers(self.opts)

    @classmethod
    def clear_leftovers(cls, opts: Any) -> list[str]:
        import nftables

        from prism_kernel.datapath import sysctl

        nft = nftables.Nftables()
        nft.set_json_output(True)
        rc, _, _ = nft.json_cmd({"nftables": [{"delete": {"table": {"family": "ip", "name": cls.table}}}]})
        lines = [f"nft table ip {cls.table}: deleted"] if rc == 0 else []
        return lines + sysctl.restore(cls.instance)


class Conntrack(NftablesMinimal):
    """What a Kubernetes node pays before prism-kernel: connection tracking on
    for every connection (kube-proxy, CNIs and Docker turn it on), no NAT and
    nothing of ours. A table whose only rule needs conntrack; the nftables data
    path's bystander tax is measured against it as well as against bare."""

    name = "conntrack"
    description = "one nft rule `ct state established accept` (conntrack on, no NAT): a typical node"
    port_offset = 6
    bystander = False  # its own measurement is a direct connection already
    table = "pkb_ct"
    instance = "pkb-ct"
    sysctls = ()

    def setup(self, env: Env, opts: Any) -> str:
        self.opts = opts
        t = {"family": "ip", "table": self.table}
        self._nft([
            {"add": {"table": {"family": "ip", "name": self.table}}},
            {"add": {"chain": {**t, "name": "out", "type": "filter", "hook": "output",
                               "prio": 0, "policy": "accept"}}},
            {"add": {"rule": {**t, "chain": "out", "expr": [
                {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "established"}},
                {"accept": None}]}}},
        ])
        addr, port = env.backend
        return f"http://{addr}:{port}/"


class Haproxy(Target):
    """HAProxy in TCP mode, one thread: the userspace proxy people use for
    this job today, and KubePrism's model (every byte crosses a process).
    Pinned to the client's CPU, as the proxy runs on the client's node."""

    name = "haproxy"
    description = "wrk -> 127.0.0.1:PORT -> haproxy (mode tcp, nbthread 1) -> backend"
    port_offset = 3

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.cfg: Path | None = None

    def setup(self, env: Env, opts: Any) -> str:
        import tempfile

        addr, port = env.backend
        listen = opts.port + self.port_offset
        fd, path = tempfile.mkstemp(prefix="pkb-haproxy-", suffix=".cfg")
        self.cfg = Path(path)
        with open(fd, "w") as f:
            f.write(
                "global\n    nbthread 1\n    maxconn 4096\n"
                "defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n"
                f"frontend fe\n    bind 127.0.0.1:{listen}\n    default_backend be\n"
                f"backend be\n    server s1 {addr}:{port}\n"
            )
        argv = ["haproxy", "-db", "-f", str(self.cfg)]
        cpu = getattr(opts, "wrk_cpu", None)
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu), *argv]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        import socket
        import time

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                self.teardown()
                raise RuntimeError(f"haproxy failed to start: {err.strip()}")
            try:
                socket.create_connection(("127.0.0.1", listen), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        return f"http://127.0.0.1:{listen}/"

    def teardown(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self.cfg is not None:
            self.cfg.unlink(missing_ok=True)
            self.cfg = None

    def cost_pids(self) -> list[int]:
        # taskset execs haproxy, so the pid is haproxy's own.
        return [self.proc.pid] if self.proc else []


TARGETS: dict[str, type[Target]] = {
    t.name: t for t in (Bare, Ebpf, EbpfBcc, EbpfHooks, EbpfHooksSockops, EbpfHooksSockAddr, Nftables,
                        NftablesNaive, NftablesMinimal, Conntrack, Haproxy)
}
DEFAULT_TARGETS = ("bare", "ebpf", "ebpf-hooks", "nftables", "nftables-minimal", "conntrack", "haproxy")
# (target, role) ÷ (target, role), paired per round, reported when both were
# measured: nftables against the floor of NAT cost, its bystander tax against
# a node that tracks connections anyway, the bcc build against the object,
# eBPF against the floor of cgroup hooks (empty programs).
REFERENCES = ((("nftables", "steered"), ("nftables-minimal", "steered")),
              (("nftables", "bystander"), ("conntrack", "steered")),
              (("ebpf-bcc", "steered"), ("ebpf", "steered")),
              (("ebpf", "bystander"), ("ebpf-hooks", "steered")),
              (("ebpf", "steered"), ("ebpf-hooks", "steered")))
