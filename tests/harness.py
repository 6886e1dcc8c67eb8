"""Drive a real prism-kernel daemon process and real clients in tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST_PORT = 17445  # never 7445: a live daemon on this machine must not be touched
TEST_INSTANCE = "pk-test"


def prism(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prism_kernel", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def cleanup_instance(instance: str = TEST_INSTANCE) -> None:
    prism("cleanup", "--instance", instance, "--force")


class Daemon:
    """`prism-kernel run` as a child process; its JSON log lines are parsed."""

    def __init__(self, endpoints: list[str], datapath: str, ca_file: str | None, tmpdir: str,
                 port: int = TEST_PORT, instance: str = TEST_INSTANCE, interval: float = 0.2,
                 timeout: float = 0.5, rise: int = 2, fall: int = 2, probe: str = "readyz",
                 cleanup_on_exit: bool = True, extra: list[str] | None = None, start: bool = True,
                 env: dict[str, str] | None = None, wrap: list[str] | None = None):
        """`env`: added to the daemon's environment; `wrap`: a command that
        execs the daemon's argv (e.g. in a mount namespace of its own)."""
        self.port = port
        self.env = dict(os.environ, **(env or {}))
        self.instance = instance
        self.interval, self.rise, self.fall = interval, rise, fall
        self.log_path = Path(tmpdir) / f"daemon-{time.monotonic_ns()}.log"
        argv = [sys.executable, "-m", "prism_kernel", "run", "--port", str(port), "--datapath", datapath,
                "--instance", instance, "--probe", probe, "--probe-interval", str(interval),
                "--probe-timeout", str(timeout), "--probe-rise", str(rise), "--probe-fall", str(fall),
                "--log-format", "json", "--metrics-port", "0"]  # any free port: never clash with a live daemon
        for e in endpoints:
            argv += ["--endpoint", e]
        if ca_file:
            argv += ["--ca-file", ca_file]
        if cleanup_on_exit:
            argv.append("--cleanup-on-exit")
        argv += extra or []
        self.argv = (wrap or []) + argv
        self.proc: subprocess.Popen | None = None
        if start:
            self.start()

    def start(self) -> None:
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=self._log, cwd=REPO, env=self.env)

    def events(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"event": "unparsed", "line": line})
        return out

    def wait_event(self, event: str, timeout: float = 15, after: int = 0, **match) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            evs = self.events()
            for ev in evs[after:]:
                if ev.get("event") == event and all(str(ev.get(k)) == str(v) for k, v in match.items()):
                    return ev
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode} waiting for {event}:\n{self.log_path.read_text()}")
            time.sleep(0.05)
        raise AssertionError(f"no {event} {match} within {timeout}s:\n{self.log_path.read_text()}")

    def metrics_url(self) -> str:
        return f"http://{self.wait_event('metrics_listening')['address']}"

    def metric_samples(self, name: str) -> dict[frozenset, float]:
        """{labels: value} of the samples called `name` in one scrape of the
        daemon's /metrics (prometheus-client's own parser)."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.metrics_url() + "/metrics", timeout=5) as r:
            text = r.read().decode()
        return {frozenset(s.labels.items()): s.value for f in text_string_to_metric_families(text)
                for s in f.samples if s.name == name}

    def probe_counts(self) -> dict[str, int]:
        """Probe results the daemon has taken into its health state so far,
        per backend address (prism_kernel_probes_total)."""
        return {dict(labels)["endpoint"]: int(v) for labels, v in self.metric_samples("prism_kernel_probes_total").items()}

    def wait_probe_rounds(self, n: int, backends: set[str] | None = None, timeout: float = 15) -> None:
        """Until the daemon has taken `n` more probe results of every backend
        in `backends` (default: every backend probed so far) into its health
        state than at the call: the positive marker after which the absence
        of a reaction (no set written, no backend down) means something."""
        start = self.probe_counts()
        want = set(start) if backends is None else set(backends)
        deadline = time.monotonic() + timeout
        while True:
            now = self.probe_counts()
            behind = {b: now.get(b, 0) - start.get(b, 0) for b in want if now.get(b, 0) - start.get(b, 0) < n}
            if not behind:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode} waiting for probe rounds:\n"
                                     f"{self.log_path.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"not {n} probe results of each of {sorted(want)} within {timeout}s "
                                     f"(got {behind})\n{self.log_path.read_text()}")
            time.sleep(0.05)

    def wait_ready(self, timeout: float = 30) -> dict:
        return self.wait_event("datapath_ready", timeout)

    def status(self) -> dict:
        st = prism("status", "--instance", self.instance, "-o", "json")
        return json.loads(st.stdout)

    def wait_active(self, expected: set[str], timeout: float = 10) -> float:
        """Wait until the daemon's written set equals `expected`; returns the time it took."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            state = self.status().get("state") or {}
            if set(state.get("active", [])) == expected:
                return time.monotonic() - start
            time.sleep(0.05)
        raise AssertionError(f"active set never became {expected}: {self.status()}\n{self.log_path.read_text()}")

    def wait_serving(self, expected: set[str], timeout: float = 10) -> dict:
        """Until every backend in `expected` is up and the written set is the
        ones of them in the lowest latency tier among them (all of them when
        their tiers agree), nothing else; returns the daemon's state. For
        tests that are not about tiers: on a loaded machine two equal test
        hosts can land in different tiers (a first tier from a 1.1 ms probe)."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.status().get("state") or {}
            rows = {b["address"]: b for b in state.get("backends", [])}
            if all(rows.get(e, {}).get("state") == "up" for e in expected):
                tiers = {e: rows[e].get("tier") for e in expected}
                best = min((t for t in tiers.values() if t is not None), default=None)
                if set(state.get("active", [])) == {e for e, t in tiers.items() if t is None or t == best}:
                    return state
            if time.monotonic() > deadline:
                raise AssertionError(f"the daemon never served {sorted(expected)}: {state}\n{self.log_path.read_text()}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "Daemon":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def client_context(ca_file: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def tcp_connect(host: str, port: int, timeout: float = 3.0, family: int = socket.AF_INET,
                reuse_addr: bool = False) -> socket.socket:
    """A connected plain TCP socket (AF_INET6: dual-stack, so that
    [::ffff:127.0.0.1] works too); closed again when connect() fails."""
    s = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    if reuse_addr:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
    except BaseException:
        s.close()
        raise
    return s


def _get(s: socket.socket, path: str, host: str) -> bytes:
    """One `Connection: close` request on an open (plain or TLS) socket; the
    whole answer, read until the server closes."""
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def http_ok(s: socket.socket) -> bool:
    """One plain-HTTP request for /readyz on an open connection; True on 200."""
    s.settimeout(3)
    return _get(s, "/readyz", "t").startswith(b"HTTP/1.1 200")


def plain_backend(srv, family: int = 4):
    """The data-path backend of a fake API server: its plain-HTTP port."""
    from prism_kernel.core.model import Backend

    addr = (srv.address4 or srv.address) if family == 4 else srv.address6
    return Backend.of(addr, srv.http_port)


def https_get(ctx: ssl.SSLContext, path: str = "/whoami", host: str = "127.0.0.1", port: int = TEST_PORT,
              timeout: float = 2.0) -> tuple[int, dict[str, str], bytes]:
    """One request on a new connection, as client-go's first request is."""
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            data = _get(s, path, host)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, body


def who(ctx: ssl.SSLContext, port: int = TEST_PORT) -> str:
    status, headers, _ = https_get(ctx, "/whoami", port=port)
    assert status == 200
    return headers["x-backend"]


def kernel_leftovers(instance: str = TEST_INSTANCE) -> list[str]:
    """Kernel state an instance may have left: nft table, BPF pins, attached programs."""
    left = []
    table = instance.replace("-", "_")
    nft = subprocess.run(["nft", "-j", "list", "tables"], capture_output=True, text=True)
    for item in json.loads(nft.stdout or '{"nftables": []}').get("nftables", []):
        t = item.get("table")
        if t and t.get("name") == table:
            left.append(f"nft table {t['family']} {table}")
    pin_dir = Path("/sys/fs/bpf") / instance
    if pin_dir.exists():
        left.append(f"bpf pins {pin_dir}: {sorted(os.listdir(pin_dir))}")
    from tests.exclusive_prog import attached_test_programs

    left += [f"exclusive test program on {hook} at the cgroup root (id {pid})"
             for hook, pid in attached_test_programs()]
    return left


@dataclass
class Request:
    t0: float  # monotonic start of the first attempt
    t1: float  # monotonic end (success or final failure)
    ok: bool
    backend: str | None
    first_error: str | None  # the first attempt's error, when it was retried
    retry_error: str | None = None  # the retry's error, when it failed too


@dataclass
class RecordingClient:
    """New connections at a steady rate (the issue's fault clients: ~200/s,
    2 s timeout per attempt, one retry), each request recorded, bounded in
    count and time. A few threads so one hanging attempt does not stall the
    rate.

    The retry waits `retry_delay` (200 ms), as real clients back off (client-go
    far longer). Immediate retries after a *refused* connect are covered by
    the kernel's exclusion (both data paths); the delay matters for a
    request whose server was killed mid-request (reset or EOF: no refusal for
    the kernel to see): by the time it retries, some other connect has been
    refused and the backend is excluded. At ~100 connects/s with 3 backends,
    50 ms left a ~13% chance that none had been refused yet; 200 ms, ~0.03%."""

    ctx: ssl.SSLContext
    port: int = TEST_PORT
    rate: float = 150.0
    timeout: float = 2.0
    threads: int = 4
    max_seconds: float = 60.0
    retry_delay: float = 0.2
    requests: list[Request] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _one(self) -> Request:
        t0 = time.monotonic()
        first_error = None
        for attempt in range(2):
            try:
                status, headers, _ = https_get(self.ctx, "/whoami", port=self.port, timeout=self.timeout)
                if status != 200:
                    raise OSError(f"http {status}")
                return Request(t0, time.monotonic(), True, headers.get("x-backend"), first_error)
            except (OSError, ValueError, IndexError) as e:
                if attempt == 0:
                    first_error = f"{type(e).__name__}: {e}"
                    time.sleep(self.retry_delay)
                else:
                    return Request(t0, time.monotonic(), False, None, first_error, f"{type(e).__name__}: {e}")
        raise AssertionError("unreachable")

    def _run(self, n: int) -> None:
        start = time.monotonic()
        i = 0
        per_thread = self.rate / self.threads
        while not self._stop.is_set() and time.monotonic() - start < self.max_seconds:
            r = self._one()
            with self._lock:
                self.requests.append(r)
            i += 1
            delay = start + i / per_thread - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)

    def __enter__(self) -> "RecordingClient":
        for n in range(self.threads):
            t = threading.Thread(target=self._run, args=(n,), daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(self.timeout * 2 + 5)

    def wait_requests(self, n: int, since: float | None = None, timeout: float = 15.0) -> None:
        """Until `n` requests that started at or after `since` (monotonic;
        default: any) have completed, successful or not."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                done = sum(1 for r in self.requests if since is None or r.t0 >= since)
            if done >= n:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"only {done} of {n} requests completed within {timeout}s")
            time.sleep(0.02)

    # --- what the fault tests assert on -------------------------------------

    def failed(self) -> list[Request]:
        return [r for r in self.requests if not r.ok]

    def retried(self) -> list[Request]:
        """Requests whose first attempt failed (whether or not the retry worked)."""
        return [r for r in self.requests if r.first_error]

    def longest(self) -> float:
        return max((r.t1 - r.t0 for r in self.requests), default=0.0)

    def last_first_try_failure(self, since: float) -> float | None:
        """When the last attempt that had to be retried started, relative to
        `since`: the last new connection steered to the faulty backend."""
        ts = [r.t0 - since for r in self.requests if r.first_error and r.t0 >= since]
        return max(ts) if ts else None


class Stream:
    """A long-lived streaming request through 127.0.0.1:PORT (like a watch):
    records which backend serves it and when it ends."""

    def __init__(self, ctx: ssl.SSLContext, port: int = TEST_PORT):
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        self.sock.sendall(b"GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise OSError("stream closed before its headers")
            head += chunk
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (ln.partition(":") for ln in head.split(b"\r\n\r\n")[0].decode().split("\r\n")[1:])}
        self.backend = headers.get("x-backend")
        self.closed_at: float | None = None
        self.error: str | None = None
        self.bytes = 0
        self.sock.settimeout(None)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while True:
                data = self.sock.recv(4096)
                if not data:
                    self.error = "eof"
                    break
                self.bytes += len(data)
        except OSError as e:
            self.error = f"{type(e).__name__}: {e}"
        self.closed_at = time.monotonic()

    @property
    def alive(self) -> bool:
        return self.closed_at is None

    def close(self) -> None:
        # Shut down first so the reader thread wakes and exits, then close:
        # closing under a thread blocked in recv() frees the fd number for the
        # next socket, and the old thread would read that socket's bytes.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(5)
        try:
            self.sock.close()
        except OSError:
            pass


def open_streams(ctx: ssl.SSLContext, want: set[str], port: int = TEST_PORT, attempts: int = 60) -> dict[str, Stream]:
    """Open streams until one lands on each backend in `want` (the kernel
    spreads them at random); the extra ones are closed."""
    got: dict[str, Stream] = {}
    for _ in range(attempts):
        s = Stream(ctx, port)
        if s.backend in want and s.backend not in got:
            got[s.backend] = s
        else:
            s.close()
        if set(got) == want:
            return got
    raise AssertionError(f"streams reached only {set(got)} of {want}")


# --- upgrades from an earlier release ---------------------------------------------


def has_so_netns_cookie() -> bool:
    """Whether this kernel answers SO_NETNS_COOKIE (Linux 5.14). The eBPF
    releases before the libbpf loader (layouts 1-4) read the host's netns
    cookie with it and refuse a kernel without it: an upgrade from them never
    happens there (the kernel matrix's 5.10 guest)."""
    with socket.socket() as s:
        try:
            s.getsockopt(socket.SOL_SOCKET, 71, 8)  # SO_NETNS_COOKIE
        except OSError:
            return False
    return True


def old_release(commit: str, dest: Path, *paths: str) -> Path:
    """`paths` of the repository at `commit`, extracted into `dest`: an earlier
    release to install before testing an upgrade. A shallow clone has no
    history to take it from: that is a skip; anything else failing is a failure."""
    import pytest

    shallow = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--is-shallow-repository"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    arch = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit, *paths],
                          capture_output=True, timeout=60)
    if arch.returncode != 0:
        if shallow == "true":
            pytest.skip(f"shallow clone: commit {commit} (the earlier release) is not in it")
        raise AssertionError(f"git archive {commit}: {arch.stderr.decode().strip()}")
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=arch.stdout, check=True, timeout=60)
    return dest


def build_program(dest: Path, source_text: str, build: bool = True,
                  object_text: str | None = None) -> dict[str, Path]:
    """A BPF program other than the release's: its source (what the bcc loader
    compiles) and its object built by bpf/build.sh from `object_text` (default:
    the same source; what the libbpf loader loads), as EbpfDatapath(source=...,
    obj=...) takes them. With build=False the object is a file libbpf cannot
    open (for a source that does not compile, or a broken object)."""
    src, obj = dest / "prism_sock.bpf.c", dest / "prism_sock.bpf.o"
    src.write_text(source_text)
    if build:
        obj_src = src
        if object_text is not None:
            obj_src = dest / "object-source.bpf.c"
            obj_src.write_text(object_text)
        r = subprocess.run(["bash", str(REPO / "bpf" / "build.sh"), str(obj), str(obj_src)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    else:
        obj.write_bytes(b"not an ELF object\n")
    return {"source": src, "obj": obj}


def run_old_release(tree: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """Run `script` with the earlier release's package first on the path."""
    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(tree)), cwd=str(tree))
    assert r.returncode == 0, r.stderr
    return r


class Hammer:
    """Calls `attempt()` in a loop on a thread, bounded in time, while the body
    of the `with` runs: what it returns is a success (kept in `results`),
    what it raises is a failure (kept in `failures`). The data-path tests use
    it to show that no connect fails while the kernel state changes."""

    def __init__(self, attempt, max_seconds: float = 30.0):
        self.attempt = attempt
        self.max_seconds = max_seconds
        self.results: list = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def ok(self) -> int:
        return len(self.results)

    def _run(self) -> None:
        end = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < end:
            try:
                self.results.append(self.attempt())
            except Exception as e:  # noqa: BLE001 - every failure counts
                self.failures.append(f"{type(e).__name__}: {e}")

    def wait_for(self, n: int, timeout: float = 20.0) -> None:
        """Until `n` more successes (or the timeout, or the loop ended)."""
        end, start = time.monotonic() + timeout, self.ok
        while self.ok - start < n and time.monotonic() < end and self._thread.is_alive():
            time.sleep(0.01)

    def __enter__(self) -> "Hammer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(self.max_seconds + 5)
