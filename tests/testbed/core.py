"""Testbed: fake Kubernetes API servers on separate "hosts" (network namespaces).

See tests/testbed/README.md for the topology and the fault switches.
"""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import json
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from tests.testbed import _sys
from tests.testbed._sys import TestbedError, ip

DEFAULT_PREFIX = "pkt"
ES_SERVICE_LABEL = "kubernetes.io/service-name"
ES_START_RV = 1000  # resourceVersions of the fake cluster start here
DELAY_TABLE = 100  # routing table (and rule preference) of a backend's link delay
_PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,5}")  # short: veth names are {prefix}h{N} (<= 15 chars)

# Prefixes with a live Testbed in this process (a second one would deadlock on the flock).
_active: dict[str, "Testbed"] = {}
_active_lock = threading.Lock()


def _state_dir(prefix: str) -> Path:
    return _sys.STATE_ROOT / prefix


def _check_prefix(prefix: str) -> None:
    if not _PREFIX_RE.fullmatch(prefix):
        raise ValueError(f"testbed prefix must match {_PREFIX_RE.pattern}, got {prefix!r}")


# --------------------------------------------------------------------------------
# clear_stale
# --------------------------------------------------------------------------------


def clear_stale(prefix: str = DEFAULT_PREFIX, *, timeout: float = 120.0) -> list[str]:
    """Remove what an interrupted earlier run with this prefix left behind:
    fake API server processes, namespaces ``{prefix}-*`` (and any process still
    in them), host veths ``{prefix}h<N>``, the host nft table ``{prefix}_testbed``,
    its temp dir, and the guard routes when no live testbed holds them.

    Waits (up to `timeout`) while another live process runs a Testbed with the
    same prefix, instead of destroying it. Returns what it removed."""
    _check_prefix(prefix)
    with _active_lock:
        if prefix in _active:
            raise TestbedError(f"clear_stale({prefix!r}) while a Testbed with that prefix is "
                               f"open in this process")
    lock = _sys.FileLock(_state_dir(prefix) / "lock")
    lock.acquire(timeout)
    try:
        return _clear_stale_locked(prefix)
    finally:
        lock.release()


def _clear_stale_locked(prefix: str) -> list[str]:
    removed: list[str] = []
    sd = _state_dir(prefix)
    procs = sd / "procs"
    # 1. server processes we recorded (pid + start time guard against pid reuse),
    #    then any fakeapi process tagged with this prefix.
    if procs.is_dir():
        for f in procs.iterdir():
            with contextlib.suppress(ValueError, OSError):
                rec = json.loads(f.read_text())
                pid = int(rec["pid"])
                if _sys.proc_starttime(pid) == rec.get("starttime") and _sys.is_fakeapi(pid):
                    _sys.kill_and_reap(pid)
                    removed.append(f"process {pid} ({f.stem})")
            f.unlink(missing_ok=True)
    for pid in _sys.fakeapi_pids(prefix):
        _sys.kill_and_reap(pid)
        removed.append(f"process {pid} (fakeapi)")
    # 2. namespaces and whatever still runs in them
    for ns in _sys.netns_list():
        if ns.startswith(f"{prefix}-"):
            for pid in _sys.netns_pids(ns):
                with contextlib.suppress(TestbedError):
                    _sys.kill_and_reap(pid)
                removed.append(f"process {pid} (in netns {ns})")
            ip("netns", "del", ns, check=False)
            removed.append(f"netns {ns}")
    # 3. host veths (deleting a namespace takes its end of the pair along, but
    #    asynchronously; delete the host end explicitly)
    for name in _sys.link_names():
        if re.fullmatch(rf"{re.escape(prefix)}h\d+", name):
            ip("link", "del", name, check=False)
            removed.append(f"link {name}")
    # 4. the host nft table of the local API servers' black hole
    #    ("add table; delete table" in one batch: gone whether it existed or not;
    #    listing the ruleset first costs ~0.1 s)
    _sys.nft_apply(_sys.drop_table_batch("inet", f"{prefix}_testbed", 0, []), None)
    # 5. the temp dir of the last run
    tmp_rec = sd / "tmpdir"
    if tmp_rec.exists():
        path = Path(tmp_rec.read_text().strip())
        if path.name.startswith(f"{prefix}-testbed-") and path.parent == Path(tempfile.gettempdir()) \
                and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(f"dir {path}")
        tmp_rec.unlink(missing_ok=True)
    # 6. guard routes no live testbed holds any more
    removed += _sys.guard_routes_release(prefix, all_of_prefix=True)
    return removed


# --------------------------------------------------------------------------------
# FakeApiServer
# --------------------------------------------------------------------------------


class FakeApiServer:
    """One fake kube-apiserver process (in a backend namespace, or in the host
    namespace for a control-plane node's local API server).

    Switch state (drain, delay, black hole) persists across stop()/start();
    counters (stats) belong to the process and start at zero after start()."""

    def __init__(self, tb: "Testbed", name: str, *, addresses: list[str], port: int,
                 http_port: int | None, netns: str | None, listen: list[str],
                 host_address: str | None = None, host_address6: str | None = None,
                 index: int | None = None):
        self._tb = tb
        self.name = name
        self.addresses = addresses          # all addresses, primary first
        self.address = addresses[0]
        self.port = port
        self.http_port = http_port
        self.netns = netns
        self.index = index
        self.host_address = host_address    # host end of the veth (None: local server)
        self.host_address6 = host_address6
        self._listen = listen
        self.cert_file = str(Path(tb.tmpdir) / f"{name}.crt")
        self.key_file = str(Path(tb.tmpdir) / f"{name}.key")
        self.control_path = str(Path(tb.tmpdir) / f"{name}.ctl")
        self.log_file = str(Path(tb.tmpdir) / f"{name}.log")
        self.pid: int | None = None
        self._proc: subprocess.Popen | None = None
        self._draining = False
        self._delay = 0.0
        self._accept_delay = 0.0
        self._blackholed = False
        self._frozen = False
        self._es_stale = False  # EndpointSlice changes it missed while frozen
        self._link_delay = 0.0
        self._delay_relay: subprocess.Popen | None = None

    # --- addresses ---------------------------------------------------------------

    @staticmethod
    def _join(address: str, port: int) -> str:
        return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"

    @property
    def endpoint(self) -> str:
        return self._join(self.address, self.port)

    @property
    def http_endpoint(self) -> str | None:
        return self._join(self.address, self.http_port) if self.http_port else None

    @property
    def url(self) -> str:
        return f"https://{self.endpoint}"

    @property
    def http_url(self) -> str | None:
        return f"http://{self.http_endpoint}" if self.http_port else None

    @property
    def address4(self) -> str | None:
        return next((a for a in self.addresses if ":" not in a), None)

    @property
    def address6(self) -> str | None:
        return next((a for a in self.addresses if ":" in a), None)

    @property
    def is_local(self) -> bool:
        return self.netns is None

    def __repr__(self) -> str:
        where = self.netns or "host netns"
        return f"<FakeApiServer {self.name} {self.endpoint} in {where} pid={self.pid}>"

    # --- process -----------------------------------------------------------------

    def _argv(self) -> list[str]:
        args = ["--name", self.name, "--tls-port", str(self.port),
                "--http-port", str(self.http_port or 0),
                "--cert", self.cert_file, "--key", self.key_file, "--ca", self._tb.ca_file,
                "--control", self.control_path, "--parent-pid", str(os.getpid()),
                "--testbed-prefix", self._tb.prefix,
                "--delay", repr(self._delay), "--accept-delay", repr(self._accept_delay)]
        for a in self._listen:
            args += ["--listen", a]
        if self._draining:
            args.append("--draining")
        args += ["--endpointslices", self._tb._es_state_file(self),
                 "--bookmark-interval", repr(self._tb._es_bookmark_interval)]
        return _sys.ns_python(self.netns, _sys.FAKEAPI_MODULE, args)

    def _spawn(self) -> None:
        if self.running:
            raise TestbedError(f"{self.name} is already running (pid {self.pid})")
        with open(self.log_file, "ab") as log:
            self._proc = subprocess.Popen(
                self._argv(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                cwd=str(_sys.REPO_ROOT), env=_sys.python_env(), close_fds=True)
        self.pid = self._proc.pid  # `ip netns exec` execs in place: the same process
        self._record()

    def _wait_ready(self, deadline: float) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._kill()
                    raise TestbedError(f"{self.name} did not come up in time; "
                                       f"log: {self._log_tail()}")
                if sel.select(left):
                    chunk = os.read(proc.stdout.fileno(), 4096)
                    if not chunk:
                        proc.wait()
                        raise TestbedError(f"{self.name} exited with {proc.returncode} before "
                                           f"it was ready; log: {self._log_tail()}")
                    buf += chunk
        proc.stdout.close()
        line = buf.split(b"\n", 1)[0].decode()
        if not line.startswith("READY "):
            self._kill()
            raise TestbedError(f"{self.name}: unexpected first line {line!r}")
        pid = json.loads(line[len("READY "):])["pid"]
        if pid != self.pid:  # an `ip` that forks: signal the server, not ip
            self.pid = pid
            self._record()

    def _record(self) -> None:
        procs = _state_dir(self._tb.prefix) / "procs"
        procs.mkdir(parents=True, exist_ok=True)
        (procs / f"{self.name}.json").write_text(json.dumps(
            {"pid": self.pid, "starttime": _sys.proc_starttime(self.pid)}))

    def _log_tail(self, n: int = 2000) -> str:
        try:
            return Path(self.log_file).read_text(errors="replace")[-n:].strip() or "(empty)"
        except OSError:
            return "(no log)"

    def _kill(self) -> None:
        pids = [p for p in {self.pid, self._proc.pid if self._proc else None} if p]
        for pid in pids:
            _sys.kill_and_reap(pid)
        if self._proc is not None:
            with contextlib.suppress(Exception):
                self._proc.wait(timeout=5)
            if self._proc.stdout and not self._proc.stdout.closed:
                self._proc.stdout.close()
        self._proc = None
        self.pid = None
        self._frozen = False
        (_state_dir(self._tb.prefix) / "procs" / f"{self.name}.json").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            os.unlink(self.control_path)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # --- fault switches ------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Start the server (same address, same certificate); returns once it accepts."""
        self._spawn()
        self._wait_ready(time.monotonic() + timeout)

    def stop(self) -> None:
        """SIGKILL the server: new connections are refused (RST), open ones die."""
        if self._proc is None:
            return
        self._kill()

    def freeze(self) -> None:
        """SIGSTOP the server: the kernel still completes TCP handshakes, nothing answers."""
        self._need_running("freeze")
        os.kill(self.pid, signal.SIGSTOP)
        self._wait_state(lambda s: s in ("T", "t"), "stopped")
        self._frozen = True

    def thaw(self) -> None:
        """SIGCONT a frozen server."""
        self._need_running("thaw")
        os.kill(self.pid, signal.SIGCONT)
        self._wait_state(lambda s: s not in ("T", "t"), "running")
        self._frozen = False
        if self._es_stale:
            self._tb._es_push(self)

    @property
    def frozen(self) -> bool:
        return self._frozen

    def blackhole(self, on: bool = True) -> None:
        """Drop every packet that reaches this host: SYNs vanish, open connections stall.
        A backend: an nft drop rule on eth0 inside its namespace. A local server:
        a drop of TCP to its port on lo in the host table ``{prefix}_testbed``."""
        on = bool(on)
        if self.netns is None:
            self._tb._local_blackhole(self, on)
        else:
            rules = [[_sys.match({"meta": {"key": "iifname"}}, "eth0"), {"drop": None}]] if on else []
            _sys.nft_apply(_sys.drop_table_batch("inet", "testbed_faults", -300, rules), self.netns)
        self._blackholed = on

    @property
    def blackholed(self) -> bool:
        return self._blackholed

    def drain(self, on: bool = True) -> None:
        """/readyz answers 503 while everything else keeps serving."""
        self._draining = bool(on)
        self._control({"op": "set", "draining": self._draining})

    def link_delay(self, seconds: float) -> None:
        """Delay every packet this host sends by `seconds` (0 = off): a far
        link, the TCP handshake included (tests/testbed/delaylink.py; IPv4).
        A backend only; persists across stop()/start() (it is the host's)."""
        if self.netns is None:
            raise TestbedError("link_delay needs a backend host (a namespace of its own)")
        if self._delay_relay is not None:
            self._link_delay_off()
        if seconds > 0:
            self._link_delay_on(seconds)
        self._link_delay = max(0.0, seconds)

    @property
    def link_delay_s(self) -> float:
        return self._link_delay

    def _link_delay_dev(self) -> str:
        return f"{self._tb.prefix}d{self.index}"

    def _link_delay_on(self, seconds: float) -> None:
        ns, dev = self.netns, self._link_delay_dev()
        relay = subprocess.Popen(
            _sys.ns_python(ns, "tests.testbed.delaylink", ["--dev", dev, "--delay", repr(seconds)]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=str(_sys.REPO_ROOT), env=_sys.python_env(), close_fds=True)
        self._delay_relay = relay
        assert relay.stdout is not None
        line = relay.stdout.readline().strip()  # "ready" once the device exists
        if line != b"ready":
            err = relay.stderr.read().decode(errors="replace") if relay.stderr else ""
            self._link_delay_off()
            raise TestbedError(f"{self.name}: the delay relay did not start: {line!r} {err.strip()}")
        _sys.run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1",
                  "net.ipv4.conf.all.rp_filter=0", f"net.ipv4.conf.{dev}.rp_filter=0",
                  f"net.ipv4.conf.{dev}.accept_local=1"])
        ip("-n", ns, "link", "set", dev, "up")
        # Packets this host originates (iif lo) to other hosts go to the relay;
        # what the relay writes back comes in on the TUN device and is
        # forwarded by the main table. Own addresses match the local table first.
        ip("-n", ns, "route", "replace", "default", "dev", dev, "table", str(DELAY_TABLE))
        ip("-n", ns, "rule", "add", "pref", str(DELAY_TABLE), "iif", "lo", "lookup", str(DELAY_TABLE))

    def _link_delay_off(self) -> None:
        ns = self.netns
        ip("-n", ns, "rule", "del", "pref", str(DELAY_TABLE), check=False)
        ip("-n", ns, "route", "flush", "table", str(DELAY_TABLE), check=False)
        relay, self._delay_relay = self._delay_relay, None
        if relay is not None:
            with contextlib.suppress(OSError):
                relay.stdin.close()  # the relay exits; its TUN device goes with its fd
            try:
                relay.wait(timeout=5)
            except subprocess.TimeoutExpired:
                relay.kill()
                relay.wait(5)
            for f in (relay.stdout, relay.stderr):
                if f is not None:
                    f.close()

    def set_delay(self, seconds: float, accept: bool | float = False) -> None:
        """Delay every response by `seconds` (0 = off). `accept=True` also delays
        the start of each new connection (TLS handshake / first read) by `seconds`;
        a number delays it by that many seconds instead."""
        self._delay = max(0.0, float(seconds))
        if accept is True:
            self._accept_delay = self._delay
        elif accept is False or accept is None:
            self._accept_delay = 0.0
        else:
            self._accept_delay = max(0.0, float(accept))
        self._control({"op": "set", "delay": self._delay, "accept_delay": self._accept_delay})

    def stats(self) -> dict:
        """Counters of the running process: requests, connections (accepted TCP
        connections, both ports), active_connections, tls_connections,
        http_connections, tls_handshake_failures, paths."""
        return self._control({"op": "stats"})["stats"]

    def reset_stats(self) -> None:
        self._control({"op": "reset_stats"})

    # --- helpers -------------------------------------------------------------------

    def _need_running(self, what: str) -> None:
        if not self.running or self.pid is None:
            raise TestbedError(f"cannot {what} {self.name}: it is not running")

    def _wait_state(self, ok, desc: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = _sys.proc_state(self.pid)
            if s is None or ok(s):
                return
            time.sleep(0.001)
        raise TestbedError(f"{self.name} (pid {self.pid}) did not become {desc}")

    def _control(self, msg: dict, timeout: float = 2.0) -> dict:
        if not self.running:
            if msg.get("op") == "set":
                return {"ok": True}  # remembered; applied by the next start()
            raise TestbedError(f"{self.name} is not running")
        if self._frozen:
            if msg.get("op") == "set":
                raise TestbedError(f"{self.name} is frozen: thaw() it before changing its state")
            raise TestbedError(f"{self.name} is frozen: it cannot answer")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.control_path)
            s.sendall((json.dumps(msg) + "\n").encode())
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        reply = json.loads(buf)
        if not reply.get("ok"):
            raise TestbedError(f"{self.name}: control {msg} failed: {reply.get('error')}")
        return reply


# --------------------------------------------------------------------------------
# Testbed
# --------------------------------------------------------------------------------


class Testbed:
    """Backend hosts in network namespaces, each running a FakeApiServer.

    Backend i: namespace ``{prefix}-be{i}``, host veth ``{prefix}h{i}`` with
    198.18.{i+1+net_offset}.1/24, namespace ``eth0`` with .2/24 and a default
    route via .1. An IPv6 backend also gets 2001:2:0:{i+1+net_offset}::1 / ::2 /64.

    Use as a context manager; everything is torn down on exit (also on
    exceptions and KeyboardInterrupt). One Testbed per prefix at a time: a
    second one (in another process) waits for the first to finish."""

    __test__ = False  # not a pytest test class

    def __init__(self, n_backends: int = 3, prefix: str = DEFAULT_PREFIX, *,
                 port: int = 6443, http_port: int | None = 8080, net_offset: int = 0,
                 start_timeout: float = 10.0, lock_timeout: float = 120.0):
        _check_prefix(prefix)
        if not 0 <= n_backends <= 250 - net_offset:
            raise ValueError("n_backends out of range")
        self.n_backends = n_backends
        self.prefix = prefix
        self.port = port
        self.http_port = http_port
        self.net_offset = net_offset
        self.start_timeout = start_timeout
        self.lock_timeout = lock_timeout
        self.backends: list[FakeApiServer] = []
        self.locals: list[FakeApiServer] = []
        self.tmpdir: str = ""
        self.ca_file = self.client_cert_file = self.client_key_file = ""
        self.host_addresses: list[str] = []
        self.setup_seconds = self.teardown_seconds = 0.0
        self._ca = None
        self._lock: _sys.FileLock | None = None
        self._netns: list[str] = []
        self._veths: list[str] = []
        self._routes_held = False
        self._local_blackholed: dict[str, int] = {}
        self._local_table = f"{prefix}_testbed"
        self._open = False
        # EndpointSlices of Service `kubernetes`: one resourceVersion counter for
        # all servers (one etcd); a model per server (what it serves) and the
        # model servers added later start with. Auto: the backends' addresses.
        self._es_rv = ES_START_RV
        self._es_auto = True
        self._es_auto_port: int | None = None
        self._es_default: dict = {"rv": ES_START_RV, "slices": {}, "tombstones": {}}
        self._es_models: dict[str, dict] = {}
        self._es_bookmark_interval = 1.0

    # --- lifecycle -----------------------------------------------------------------

    def __enter__(self) -> "Testbed":
        self.open()
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def open(self) -> None:
        if os.geteuid() != 0:
            raise TestbedError("the testbed needs root (network namespaces, veths, nftables)")
        t0 = time.monotonic()
        with _active_lock:
            if self.prefix in _active:
                raise TestbedError(f"a Testbed with prefix {self.prefix!r} is already open "
                                   f"in this process")
            _active[self.prefix] = self
        self._open = True
        try:
            self._lock = _sys.FileLock(_state_dir(self.prefix) / "lock")
            self._lock.acquire(self.lock_timeout)
            _clear_stale_locked(self.prefix)
            _sys.guard_routes_acquire(self.prefix)
            self._routes_held = True
            self.tmpdir = tempfile.mkdtemp(prefix=f"{self.prefix}-testbed-")
            (_state_dir(self.prefix) / "tmpdir").write_text(self.tmpdir)
            self._make_ca()
            new = [self._add_backend_host(ipv6=False) for _ in range(self.n_backends)]
            self._es_refresh_auto()
            self._start_all(new)
        except BaseException:
            self.close()
            raise
        self.setup_seconds = time.monotonic() - t0

    def close(self) -> None:
        """Tear everything down. Idempotent; a second Ctrl-C during teardown is
        held back until teardown is done (when called from the main thread)."""
        if not self._open:
            return
        t0 = time.monotonic()
        old = None
        if threading.current_thread() is threading.main_thread():
            with contextlib.suppress(ValueError, TypeError):
                old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        errors: list[str] = []

        def attempt(what: str, fn, *a) -> None:
            try:
                fn(*a)
            except Exception as e:  # keep tearing down; report at the end
                errors.append(f"{what}: {e}")

        try:
            for srv in self.backends + self.locals:
                attempt(f"stop {srv.name}", srv._kill)
            for ns in self._netns:
                for pid in _sys.netns_pids(ns):
                    attempt(f"kill {pid} in {ns}", _sys.kill_and_reap, pid)
            present = set(_sys.link_names())
            for veth in self._veths:
                if veth in present:
                    attempt(f"delete {veth}", ip, "link", "del", veth)
            ns_present = set(_sys.netns_list())
            for ns in self._netns:
                if ns in ns_present:
                    attempt(f"delete netns {ns}", ip, "netns", "del", ns)
            if self._local_blackholed:
                self._local_blackholed.clear()
                attempt("delete host nft table", _sys.nft_apply,
                        _sys.drop_table_batch("inet", self._local_table, 0, []), None)
            if self.tmpdir:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
                (_state_dir(self.prefix) / "tmpdir").unlink(missing_ok=True)
            if self._routes_held:
                attempt("release guard routes", _sys.guard_routes_release, self.prefix)
                self._routes_held = False
            if self._lock is not None:
                self._lock.release()
                self._lock = None
        finally:
            self._open = False
            with _active_lock:
                if _active.get(self.prefix) is self:
                    del _active[self.prefix]
            if old is not None:
                signal.signal(signal.SIGINT, old)
            self.teardown_seconds = time.monotonic() - t0
        if errors:
            raise TestbedError("teardown incomplete: " + "; ".join(errors))

    # --- certificates --------------------------------------------------------------

    def _make_ca(self) -> None:
        import trustme

        self._ca = trustme.CA(organization_name="prism-kernel testbed")
        self.ca_file = str(Path(self.tmpdir) / "ca.crt")
        self._ca.cert_pem.write_to_path(self.ca_file)
        client = self._ca.issue_cert("prism-kernel-client.testbed.invalid",
                                     common_name="system:prism-kernel",
                                     organization_name="system:nodes")
        self.client_cert_file = str(Path(self.tmpdir) / "client.crt")
        self.client_key_file = str(Path(self.tmpdir) / "client.key")
        self._write_cert(client, self.client_cert_file, self.client_key_file)

    @staticmethod
    def _write_cert(cert, cert_file: str, key_file: str) -> None:
        Path(cert_file).write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(key_file)
        os.chmod(key_file, 0o600)

    def _issue_server_cert(self, srv: FakeApiServer) -> None:
        names = list(dict.fromkeys([*srv.addresses, "127.0.0.1", "::1", "localhost",
                                    "kubernetes", "kubernetes.default",
                                    "kubernetes.default.svc",
                                    "kubernetes.default.svc.cluster.local"]))
        cert = self._ca.issue_cert(*names, common_name=f"kube-apiserver-{srv.name}")
        self._write_cert(cert, srv.cert_file, srv.key_file)

    # --- hosts -----------------------------------------------------------------------

    def _need_open(self) -> None:
        if not self._open:
            raise TestbedError("the testbed is not open (use it as a context manager)")

    def _add_backend_host(self, ipv6: bool) -> FakeApiServer:
        i = len(self.backends)
        octet = i + 1 + self.net_offset
        if octet > 254:
            raise TestbedError("out of backend subnets")
        ns, veth, name = f"{self.prefix}-be{i}", f"{self.prefix}h{i}", f"be{i}"
        host4, peer4 = f"198.18.{octet}.1", f"198.18.{octet}.2"
        host6 = peer6 = None
        if ipv6:
            if not _sys._ipv6_enabled():
                raise TestbedError("IPv6 is disabled on this host")
            host6, peer6 = f"2001:2:0:{octet:x}::1", f"2001:2:0:{octet:x}::2"
        self._check_free(host4, host6)

        self._netns.append(ns)
        ip("netns", "add", ns)
        self._veths.append(veth)
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("addr", "add", f"{host4}/24", "dev", veth)
        if ipv6:
            ip("addr", "add", f"{host6}/64", "dev", veth, "nodad")
        ip("link", "set", veth, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "addr", "add", f"{peer4}/24", "dev", "eth0")
        if ipv6:
            ip("-n", ns, "addr", "add", f"{peer6}/64", "dev", "eth0", "nodad")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "route", "add", "default", "via", host4)
        if ipv6:
            ip("-n", ns, "-6", "route", "add", "default", "via", host6)
        addresses = [peer6, peer4] if ipv6 else [peer4]
        listen = ["0.0.0.0", "::"] if ipv6 else ["0.0.0.0"]
        srv = FakeApiServer(self, name, addresses=addresses, port=self.port,
                            http_port=self.http_port, netns=ns, listen=listen,
                            host_address=host4, host_address6=host6, index=i)
        self._issue_server_cert(srv)
        self.backends.append(srv)
        self.host_addresses.append(host4)
        return srv

    @staticmethod
    def _check_free(*addresses: str | None) -> None:
        """Refuse to reuse a test subnet someone else (another prefix, another
        engineer's run) already configured on this host."""
        want = {ipaddress.ip_address(a) for a in addresses if a}
        for link in _sys.ip_json("addr", "show"):
            for a in link.get("addr_info", []):
                net = ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network
                for w in want:
                    if w in net:
                        raise TestbedError(f"{w} is already in use: {link['ifname']} has "
                                           f"{a['local']}/{a['prefixlen']} (use net_offset=)")

    def _start_all(self, servers: list[FakeApiServer]) -> None:
        for srv in servers:
            srv._spawn()
        deadline = time.monotonic() + self.start_timeout
        for srv in servers:
            srv._wait_ready(deadline)

    def add_backend(self, ipv6: bool = False) -> FakeApiServer:
        """One more backend host. With ipv6=True it is dual-stack and its
        `address`/`endpoint` are the IPv6 ones (2001:2:0:N::2); `address4` is the
        IPv4 one."""
        self._need_open()
        srv = self._add_backend_host(ipv6=ipv6)
        self._es_refresh_auto()
        self._start_all([srv])
        return srv

    def add_local_apiserver(self, port: int, http_port: int | None = None,
                            name: str | None = None, ipv6: bool = False) -> FakeApiServer:
        """A FakeApiServer in the host namespace on 127.0.0.1:`port` (plus [::1]
        with ipv6=True; plain HTTP on 127.0.0.1:`http_port` when given)."""
        self._need_open()
        name = name or f"local{len(self.locals)}"
        if any(s.name == name for s in self.backends + self.locals):
            raise ValueError(f"duplicate server name {name}")
        addresses = ["127.0.0.1", "::1"] if ipv6 else ["127.0.0.1"]
        srv = FakeApiServer(self, name, addresses=addresses, port=port,
                            http_port=http_port, netns=None, listen=addresses)
        self._issue_server_cert(srv)
        self.locals.append(srv)
        self._start_all([srv])
        return srv

    def _local_blackhole(self, srv: FakeApiServer, on: bool) -> None:
        if on:
            self._local_blackholed[srv.name] = srv.port
        else:
            self._local_blackholed.pop(srv.name, None)
        rules = [[_sys.match({"meta": {"key": "iifname"}}, "lo"),
                  _sys.match({"meta": {"key": "l4proto"}}, "tcp"),
                  _sys.match({"payload": {"protocol": "tcp", "field": "dport"}}, port),
                  {"drop": None}]
                 for port in sorted(set(self._local_blackholed.values()))]
        _sys.nft_apply(_sys.drop_table_batch("inet", self._local_table, -300, rules), None)

    # --- EndpointSlices of Service `kubernetes` -----------------------------------------

    @staticmethod
    def endpointslice_objects(addresses: list[str], port: int = 6443, *,
                              not_ready: list[str] | tuple = (), service: str = "kubernetes",
                              namespace: str = "default") -> list[dict]:
        """The EndpointSlices kube-apiserver publishes for `addresses` (one slice per
        family: `kubernetes` for the first, `kubernetes-v6`/`-v4` for the other;
        the only label kubernetes.io/service-name, as its endpoint reconciler
        writes them), each endpoint ready unless listed in `not_ready`, port
        `https`. No addresses: one IPv4 slice without endpoints."""
        by_family: dict[int, list[str]] = {}
        for a in list(addresses) + [a for a in not_ready if a not in addresses]:
            ip = ipaddress.ip_address(a)
            by_family.setdefault(ip.version, [])
            if ip.compressed not in by_family[ip.version]:
                by_family[ip.version].append(ip.compressed)
        if not by_family:
            by_family[4] = []
        nr = {ipaddress.ip_address(a).compressed for a in not_ready}
        out = []
        for i, (fam, addrs) in enumerate(by_family.items()):
            name = service if i == 0 else f"{service}-v{fam}"
            out.append({
                "kind": "EndpointSlice",
                "apiVersion": "discovery.k8s.io/v1",
                "metadata": {"name": name, "namespace": namespace,
                             "labels": {ES_SERVICE_LABEL: service}},
                "addressType": f"IPv{fam}",
                "endpoints": [{"addresses": [a], "conditions": {"ready": a not in nr}}
                              for a in addrs],
                "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
            })
        return out

    def set_endpointslices(self, addresses: list[str] | None = None, port: int | None = None, *,
                           not_ready: list[str] | tuple = (), slices: list[dict] | None = None,
                           servers: "list[FakeApiServer | str] | None" = None) -> int:
        """Change the EndpointSlices of Service `kubernetes` the fake servers serve;
        open watches get ADDED/MODIFIED/DELETED events. `addresses` (IPv4/IPv6)
        with `port` (default: the testbed's port) and `not_ready` addresses, or
        raw `slices` (EndpointSlice objects: FQDN slices, other ports or labels).
        Neither: back to the default, the backends' addresses. `servers`: only
        these (per-server state); default all, and servers added later.
        Returns the resourceVersion after the change (the same counter for all
        servers, like one etcd). In effect on every running server on return."""
        self._need_open()
        if slices is not None and addresses is not None:
            raise ValueError("give addresses or slices, not both")
        if addresses is None and slices is None:
            if servers is not None:
                raise ValueError("the default (backends' addresses) is for all servers")
            self._es_auto, self._es_auto_port = True, port
            return self._es_refresh_auto()
        if slices is None:
            objs = self.endpointslice_objects(list(addresses or []), port or self.port,
                                              not_ready=not_ready)
        else:
            objs = []
            for sl in slices:
                sl = copy.deepcopy(sl)
                md = sl.setdefault("metadata", {})
                if not md.get("name"):
                    raise ValueError("every slice needs metadata.name")
                md.setdefault("namespace", "default")
                md.setdefault("labels", {ES_SERVICE_LABEL: "kubernetes"})
                sl.setdefault("kind", "EndpointSlice")
                sl.setdefault("apiVersion", "discovery.k8s.io/v1")
                objs.append(sl)
        if servers is None:
            self._es_auto = False
        return self._es_set(objs, None if servers is None else [self._server(s) for s in servers])

    def endpointslices(self, server: "FakeApiServer | str | None" = None) -> list[dict]:
        """The EndpointSlices `server` serves (default: what all servers serve)."""
        model = self._es_default if server is None else self._es_model(self._server(server))
        return [copy.deepcopy(o) for _n, o in sorted(model["slices"].items())]

    @property
    def endpointslice_rv(self) -> int:
        return self._es_rv

    def expire_endpointslice_watches(self, servers=None) -> int:
        """410 Gone, as when the watch cache has moved on: history dropped (a watch
        from an older resourceVersion than the current one gets an ERROR 410) and
        every open watch gets an ERROR 410 event and ends. Returns how many
        watches were open."""
        n = 0
        for srv in self._es_targets(servers):
            srv._control({"op": "compact"})
            n += srv._control({"op": "expire_watches"})["watches"]
        return n

    def close_endpointslice_watches(self, servers=None) -> int:
        """End every open watch cleanly, as its timeoutSeconds would. Returns how many."""
        return sum(srv._control({"op": "close_watches"})["watches"]
                   for srv in self._es_targets(servers))

    def set_watch_bookmarks(self, interval: float) -> None:
        """Seconds between BOOKMARK events on watches that allow them (0 = none);
        default 1 s. Kept across stop()/start()."""
        self._es_bookmark_interval = max(0.0, float(interval))
        for srv in self._es_targets(None):
            srv._control({"op": "set", "bookmark_interval": self._es_bookmark_interval})

    def endpointslice_stats(self, server: "FakeApiServer | str") -> dict:
        """EndpointSlice counters of a running server: gets, lists, watches, gone,
        unauthorized, events_sent, bookmarks_sent, last_auth, last_client_cn,
        last_user_agent, last_query; plus active_watches."""
        srv = self._server(server)
        reply = srv._control({"op": "stats"})
        return {**reply["stats"]["endpointslices"], "active_watches": reply["watches"]}

    # internals

    def _server(self, s: "FakeApiServer | str") -> FakeApiServer:
        return s if isinstance(s, FakeApiServer) else self.backend(s)

    def _es_targets(self, servers) -> list[FakeApiServer]:
        targets = self.servers if servers is None else [self._server(s) for s in servers]
        return [s for s in targets if s.running and not s.frozen]

    def _es_model(self, srv: FakeApiServer) -> dict:
        if srv.name not in self._es_models:
            self._es_models[srv.name] = copy.deepcopy(self._es_default)
        return self._es_models[srv.name]

    def _es_state_file(self, srv: FakeApiServer) -> str:
        model = self._es_model(srv)
        path = Path(self.tmpdir) / f"{srv.name}.endpointslices.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rv": model["rv"], "slices": list(model["slices"].values()),
                                   "tombstones": model["tombstones"]}))
        os.replace(tmp, path)
        srv._es_stale = False
        return str(path)

    def _es_refresh_auto(self) -> int:
        if not self._es_auto:
            return self._es_rv
        addrs = [s.address4 or s.address for s in self.backends]
        return self._es_set(self.endpointslice_objects(addrs, self._es_auto_port or self.port), None)

    @staticmethod
    def _es_content(obj: dict) -> dict:
        o = copy.deepcopy(obj)
        md = o.get("metadata", {})
        for k in ("resourceVersion", "generation", "uid", "creationTimestamp"):
            md.pop(k, None)
        return o

    def _es_set(self, objs: list[dict], targets: list[FakeApiServer] | None) -> int:
        new = {o["metadata"]["name"]: o for o in objs}
        models = [self._es_model(s) for s in (self.servers if targets is None else targets)]
        if targets is None:
            models.append(self._es_default)
        changed: set[str] = set()
        for m in models:
            for name, obj in new.items():
                old = m["slices"].get(name)
                if old is None or self._es_content(old) != self._es_content(obj):
                    changed.add(name)
            changed |= set(m["slices"]) - set(new)
        if not changed:
            return self._es_rv
        rv_of = {}
        for name in sorted(changed):
            self._es_rv += 1
            rv_of[name] = self._es_rv
        for m in models:
            slices = {}
            for name, obj in new.items():
                old = m["slices"].get(name)
                if old is not None and self._es_content(old) == self._es_content(obj):
                    slices[name] = old
                    continue
                obj = copy.deepcopy(obj)
                md = obj["metadata"]
                md["resourceVersion"] = str(rv_of[name])
                md["generation"] = (old or {}).get("metadata", {}).get("generation", 0) + 1
                md["uid"] = (old or {}).get("metadata", {}).get("uid") or \
                    f"00000000-0000-4000-8000-{rv_of[name]:012d}"
                md["creationTimestamp"] = (old or {}).get("metadata", {}).get("creationTimestamp") \
                    or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                slices[name] = obj
                m["tombstones"].pop(name, None)
            for name in set(m["slices"]) - set(new):
                m["tombstones"][name] = rv_of[name]
            m["slices"] = slices
            m["rv"] = self._es_rv
        for srv in (self.servers if targets is None else targets):
            self._es_push(srv)
        return self._es_rv

    def _es_push(self, srv: FakeApiServer) -> None:
        if not srv.running:
            return  # start() hands it the state
        if srv.frozen:
            srv._es_stale = True  # thaw() hands it the state
            return
        m = self._es_model(srv)
        srv._control({"op": "endpointslices", "rv": m["rv"], "slices": list(m["slices"].values()),
                      "tombstones": m["tombstones"]})
        srv._es_stale = False

    # --- conveniences --------------------------------------------------------------

    @property
    def servers(self) -> list[FakeApiServer]:
        return self.backends + self.locals

    def heal(self) -> None:
        """Every server running, reachable and ready again, whatever fault a
        test left switched on (tests call it when they end, pass or fail)."""
        for srv in self.servers:
            if srv.blackholed:
                srv.blackhole(False)
            if srv.running and srv.frozen:
                srv.thaw()
            if not srv.running:
                srv.start()
            elif srv._draining:
                srv.drain(False)
            if srv.link_delay_s:
                srv.link_delay(0)

    def backend(self, name: str) -> FakeApiServer:
        for s in self.servers:
            if s.name == name:
                return s
        raise KeyError(name)

    def ssl_context(self, client_cert: bool = False):
        """A client SSLContext that trusts the test CA (and presents the client cert)."""
        import ssl

        ctx = ssl.create_default_context(cafile=self.ca_file)
        ctx.set_alpn_protocols(["http/1.1"])
        if client_cert:
            ctx.load_cert_chain(self.client_cert_file, self.client_key_file)
        return ctx

    def get(self, target: "FakeApiServer | str", path: str = "/whoami", *, tls: bool = True,
            timeout: float = 2.0, client_cert: bool = False, method: str = "GET"):
        """One request over a new connection to a server (its TLS or plain-HTTP
        port) or to "host:port" (e.g. "127.0.0.1:7445"); returns a
        tests.testbed.client.Response (.status, .headers, .body, .json(), .backend)."""
        from tests.testbed.client import request

        if isinstance(target, FakeApiServer):
            host = target.address
            port = target.port if tls else target.http_port
            if port is None:
                raise TestbedError(f"{target.name} has no plain-HTTP port")
        else:
            host, _, p = target.rpartition(":")
            port = int(p)
        ctx = self.ssl_context(client_cert) if tls else None
        return request(host, port, path, ssl_context=ctx, timeout=timeout, method=method)

    def write_kubeconfig(self, server: str = "https://127.0.0.1:7445", path: str | None = None,
                         client_cert: bool = False, name: str = "testbed") -> str:
        """Write a kubeconfig for `server` trusting tb.ca_file; returns its path."""
        # Some credential is needed, or kubectl prompts for a username; the fake
        # servers accept anything.
        user: dict = {"token": "prism-kernel-testbed"}
        if client_cert:
            user = {"client-certificate": self.client_cert_file,
                    "client-key": self.client_key_file}
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": name, "cluster": {"server": server,
                                                    "certificate-authority": self.ca_file}}],
            "users": [{"name": name, "user": user}],
            "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
            "current-context": name,
        }
        path = path or str(Path(self.tmpdir) / f"kubeconfig-{name}-{len(os.listdir(self.tmpdir))}")
        Path(path).write_text(json.dumps(cfg, indent=2))  # JSON is YAML
        return path
