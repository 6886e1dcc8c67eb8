"""The benchmark's test host: a network namespace with nginx behind a veth.

    host  pkb0  198.19.0.1/24  <-- veth -->  pkb1 198.19.0.2/24  (netns pkb-srv)
                                                   nginx :80, `return 200 "ok"`

Everything is named with the prefix "pkb" and lives in 198.19.0.0/24 (inside
the benchmarking range 198.18.0.0/15). `clear_leftovers()` removes what an
interrupted earlier run left; `Env` removes what it made on exit, also on
failure and Ctrl-C (the caller turns SIGTERM into an exception). The
`unreachable 198.18.0.0/15` route is added when missing and removed at the
end only when this run added it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

PREFIX = "pkb"
NETNS = f"{PREFIX}-srv"
HOST_IF, NS_IF = f"{PREFIX}0", f"{PREFIX}1"
HOST_ADDR, BACKEND_ADDR = "198.19.0.1", "198.19.0.2"
PREFIXLEN = 24
BACKEND_PORT = 80
# Per-phase backend addresses (fresh_backend): 198.19.0.10 - 198.19.0.209.
FIRST_PHASE_HOST, PHASE_HOSTS = 10, 200
GUARD_ROUTE = "198.18.0.0/15"
# Not /run/<instance>: that is the data path's (its sysctl backup lives there).
STATE_DIR = Path("/run") / f"{PREFIX}-env"
NGINX_PID = STATE_DIR / "nginx.pid"


class EnvError(RuntimeError):
    pass


def sh(*argv: str, check: bool = True, ns: str | None = None, timeout: float = 30,
       input: str | None = None) -> subprocess.CompletedProcess:
    if ns:
        argv = ("ip", "netns", "exec", ns, *argv)
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    if check and cp.returncode != 0:
        raise EnvError(f"{' '.join(argv)}: {cp.stderr.strip() or cp.stdout.strip()}")
    return cp


def _kill_pidfile(path: Path) -> None:
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGTERM)  # nginx master: workers follow
    except ProcessLookupError:
        pass
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    path.unlink(missing_ok=True)


def clear_leftovers() -> list[str]:
    """Remove test hosts a crashed run left (by name: pkb-* netns, pkb* links)."""
    done = []
    _kill_pidfile(NGINX_PID)
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(f"{PREFIX}-"):
            sh("ip", "netns", "del", name, check=False)
            done.append(f"netns {name}")
    for line in sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            ifname = parts[1].strip().split("@")[0]
            if ifname.startswith(PREFIX) and ifname[len(PREFIX):].isdigit():
                sh("ip", "link", "del", ifname, check=False)
                done.append(f"link {ifname}")
    return done


def nginx_conf(cpu: int | None, worker_dir: Path) -> str:
    affinity = f"worker_cpu_affinity {1 << cpu:b};" if cpu is not None else ""
    return f"""
worker_processes 1;
{affinity}
daemon off;
pid {NGINX_PID};
error_log {worker_dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 60s;
  client_body_temp_path {worker_dir}/body;
  proxy_temp_path {worker_dir}/proxy;
  fastcgi_temp_path {worker_dir}/fastcgi;
  uwsgi_temp_path {worker_dir}/uwsgi;
  scgi_temp_path {worker_dir}/scgi;
  server {{
    listen {BACKEND_PORT} backlog=8192;
    location / {{ return 200 "ok\\n"; }}
  }}
}}
"""


@dataclass
class Env:
    """Context manager: the namespace, the veth pair and nginx."""

    nginx_cpu: int | None = 0

    def __post_init__(self) -> None:
        self.added_guard_route = False
        self._made: list[str] = []
        self._nginx: subprocess.Popen | None = None
        self._backend_addr = BACKEND_ADDR
        self._phase = -1
        self._addrs: set[str] = set()

    @property
    def backend(self) -> tuple[str, int]:
        return self._backend_addr, BACKEND_PORT

    def fresh_backend(self) -> tuple[str, int]:
        """Move the backend to an address no earlier phase used. A target may
        change net.ipv4.tcp_timestamps (the nftables path sets 2, removing it
        restores 1); the backend's TIME_WAIT sockets of a phase with the other
        setting then reject the next phase's SYNs on the same 4-tuples (PAWS),
        and that phase would measure SYN retransmits, not its data path."""
        self._phase += 1
        addr = f"198.19.0.{FIRST_PHASE_HOST + (self._phase % PHASE_HOSTS)}"
        if addr not in self._addrs:
            sh("ip", "addr", "add", f"{addr}/{PREFIXLEN}", "dev", NS_IF, ns=NETNS)
            self._addrs.add(addr)
        self._backend_addr = addr
        return self.backend

    def __enter__(self) -> "Env":
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _setup(self) -> None:
        routes = sh("ip", "route", "show", "table", "main", "type", "unreachable").stdout
        if not any(line.split()[:2] == ["unreachable", GUARD_ROUTE] or line.split()[:1] == [GUARD_ROUTE]
                   for line in routes.splitlines()):
            sh("ip", "route", "replace", "unreachable", GUARD_ROUTE)
            self.added_guard_route = True
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        sh("ip", "netns", "add", NETNS)
        self._made.append("netns")
        sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF, "netns", NETNS)
        self._made.append("link")
        sh("ip", "addr", "add", f"{HOST_ADDR}/{PREFIXLEN}", "dev", HOST_IF)
        sh("ip", "link", "set", HOST_IF, "up")
        sh("ip", "addr", "add", f"{BACKEND_ADDR}/{PREFIXLEN}", "dev", NS_IF, ns=NETNS)
        sh("ip", "link", "set", NS_IF, "up", ns=NETNS)
        sh("ip", "link", "set", "lo", "up", ns=NETNS)
        work = STATE_DIR / "nginx"
        work.mkdir(parents=True, exist_ok=True)
        conf = STATE_DIR / "nginx.conf"
        conf.write_text(nginx_conf(self.nginx_cpu, work))
        # A child of ours (not daemonized), so that it is reaped; the pid file
        # lets a later run kill it if this one dies without cleaning up.
        self._nginx = subprocess.Popen(
            ["ip", "netns", "exec", NETNS, "nginx", "-c", str(conf), "-p", str(work),
             "-e", str(work / "error.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._made.append("nginx")
        deadline = time.monotonic() + 5
        url = f"http://{BACKEND_ADDR}:{BACKEND_PORT}/"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.read() == b"ok\n":
                        return
            except OSError:
                pass
            if self._nginx.poll() is not None:
                err = self._nginx.stderr.read().decode(errors="replace") if self._nginx.stderr else ""
                raise EnvError(f"nginx in {NETNS} exited: {err.strip()}")
            if time.monotonic() > deadline:
                raise EnvError(f"nginx in {NETNS} does not answer at {url}")
            time.sleep(0.05)

    def nginx_pids(self) -> list[int]:
        try:
            master = int(NGINX_PID.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        kids = sh("pgrep", "-P", str(master), check=False).stdout.split()
        return [master, *map(int, kids)]

    def close(self) -> None:
        if "nginx" in self._made:
            _kill_pidfile(NGINX_PID)
            if self._nginx is not None:
                try:
                    self._nginx.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._nginx.kill()
                    self._nginx.wait()
        if "netns" in self._made:
            sh("ip", "netns", "del", NETNS, check=False)
        if "link" in self._made:
            sh("ip", "link", "del", HOST_IF, check=False)  # usually gone with the netns
        self._made.clear()
        if self.added_guard_route:
            sh("ip", "route", "del", "unreachable", GUARD_ROUTE, check=False)
            self.added_guard_route = False
        try:
            for p in sorted(STATE_DIR.rglob("*"), reverse=True):
                p.rmdir() if p.is_dir() else p.unlink()
            STATE_DIR.rmdir()
        except OSError:
            pass
