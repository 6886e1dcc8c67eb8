"""A local user's expiring SYNs (issue 12 item 5): one unprivileged process
whose steered SYNs to one backend never arrive (IP_TTL=1 towards a routed
backend; here an nftables rule in the host's output hook drops the SYNs of
uid 65534 to that backend) cannot keep that healthy backend out: the kernel
marks it suspect at most one window in five (bpf/prism_sock.bpf.c,
pk_mark_suspect), the daemon confirms it at most once per spacing
(core/confirm_limit.py), it never goes down and stays in the set; and a real
black hole of another backend in the same run is still out as fast.
docs/design/confirm-limit.md.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.harness import TEST_PORT, Daemon

pytestmark = pytest.mark.kernel

NOBODY = 65534
TABLE = "pk_test_local_user"  # the nft table this test creates and always deletes
ATTACK_S = 12.0  # the local user's loop
# The attacker needs only the standard library; the venv may not be
# readable by uid 65534.
ATTACKER_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
HOLE_AT_S = 6.0  # the other backend is black-holed this far into the attack
# The attacker: non-blocking steered connects, each held 1.5 s (its SYN
# retransmits every RTO meanwhile), at most 20 open; bounded by ATTACK_S.
ATTACKER = r"""
import socket, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
end = time.monotonic() + seconds
held = []
made = 0
while time.monotonic() < end:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.connect_ex(("127.0.0.1", port))
    made += 1
    held.append((time.monotonic(), s))
    while held and (time.monotonic() - held[0][0] > 1.5 or len(held) > 20):
        held.pop(0)[1].close()
    time.sleep(0.02)  # pacing of the loop, not a synchronisation
for _, s in held:
    s.close()
print(made)
"""


def nft(script: str) -> None:
    subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True, capture_output=True)


def drop_nobodys_syns_to(address: str, port: int) -> None:
    nft(f"""table inet {TABLE} {{
  chain out {{
    type filter hook output priority 0; policy accept;
    meta skuid {NOBODY} ip daddr {address} tcp dport {port} tcp flags & (syn | ack) == syn drop
  }}
}}
""")


def delete_table() -> None:
    subprocess.run(["nft", "delete", "table", "inet", TABLE], check=False, capture_output=True)  # absent: fine


class RootClient:
    """Plain TCP connects through 127.0.0.1:PORT at ~50/s from this (root)
    process, whose SYNs are not dropped: which backend each one reached (by
    the host end of the backend's veth: getpeername() answers 127.0.0.1),
    or the error. Bounded by `seconds`."""

    def __init__(self, tb, seconds: float):
        self.by_host = {b.host_address: b.endpoint for b in tb.backends}
        self.seconds = seconds
        self.results: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        end = time.monotonic() + self.seconds
        while not self._stop.is_set() and time.monotonic() < end:
            t = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", TEST_PORT), timeout=1.0) as s:
                    got = self.by_host.get(s.getsockname()[0], "unknown")
            except OSError as e:
                got = f"error: {type(e).__name__}"
            self.results.append((t, got))
            self._stop.wait(0.02)

    def between(self, t0: float, t1: float) -> list[str]:
        return [got for t, got in self.results if t0 <= t < t1]

    def __enter__(self) -> RootClient:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def test_a_local_users_expiring_syns_cannot_keep_a_healthy_backend_out(testbed):
    tb = testbed
    endpoints = [b.endpoint for b in tb.backends]
    delete_table()
    # Probes every second (the default), so that the kernel's reports and
    # the confirmations, not the scheduled probes, are what reacts first.
    with Daemon(endpoints, "ebpf", tb.ca_file, tb.tmpdir, interval=1.0, timeout=1.0) as d:
        d.wait_ready()
        state = d.wait_serving(set(endpoints))
        active = sorted(state["active"])
        victim = next(b for b in tb.backends if b.endpoint == active[0])
        hole = next(b for b in tb.backends if b is not victim and b.endpoint in active[1:]) \
            if len(active) > 1 else next(b for b in tb.backends if b is not victim)
        mark = len(d.events())
        try:
            drop_nobodys_syns_to(victim.address4, victim.port)
            with RootClient(tb, ATTACK_S + 2) as client:
                attacker = subprocess.Popen(
                    ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                     ATTACKER_PYTHON, "-I", "-c", ATTACKER, str(TEST_PORT), str(ATTACK_S)],
                    stdout=subprocess.PIPE, text=True)
                t0 = time.monotonic()
                try:
                    # The attack works: the kernel saw the victim's SYNs time out.
                    first = d.wait_event("passive_failure", after=mark, address=victim.endpoint, timeout=5)
                    assert first["kernel_saw"] == "kernel: SYN timeout", first
                    d.wait_event("failure_unconfirmed", after=mark, address=victim.endpoint, timeout=5)
                    # Phase B: a real black hole of another backend, same run.
                    remaining = t0 + HOLE_AT_S - time.monotonic()
                    assert remaining > 0, "the attack's first reaction took the whole first phase"
                    time.sleep(remaining)  # the end of the first phase: a duration, not a wait for a state
                    hole_mark = len(d.events())
                    holed_at = time.monotonic()
                    hole.blackhole()
                    down = d.wait_event("backend_down", after=hole_mark, address=hole.endpoint, timeout=10)
                    detected_s = time.monotonic() - holed_at
                    made = int(attacker.communicate(timeout=ATTACK_S + 10)[0])
                finally:
                    if attacker.poll() is None:
                        attacker.kill()
                        attacker.wait(5)
        finally:
            delete_table()
            hole.blackhole(False)
        evs = d.events()[mark:]
        phase_a = client.between(t0, t0 + HOLE_AT_S)
        share = phase_a.count(victim.endpoint) / max(1, len(phase_a))
        fair = 1 / len(active)
        confirms = [e for e in evs if e.get("event") == "passive_failure" and e.get("address") == victim.endpoint]
        limited = [e for e in evs if e.get("event") == "confirm_rate_limited" and e.get("address") == victim.endpoint]
        print(f"attacker (uid {NOBODY}): {made} steered connects in {ATTACK_S:.0f} s; "
              f"victim {victim.endpoint}: {len(confirms)} confirmations, {len(limited)} confirm_rate_limited "
              f"lines; root's connects in the first {HOLE_AT_S:.0f} s: {len(phase_a)}, "
              f"{share:.3f} to the victim (fair share {fair:.3f}); "
              f"black hole of {hole.endpoint} out {detected_s:.3f} s after it began ({down['reason']})")
        assert made > 100
        # The healthy backend never went down and stays in the written set.
        assert not [e for e in evs if e.get("event") == "backend_down" and e.get("address") == victim.endpoint], \
            d.log_path.read_text()
        assert victim.endpoint in d.status()["state"]["active"]
        # Confirmations under the limit: at 0, 1, 3, 7 s (+ the handshakes'
        # own time), then every 8 s: at most 5 in 12 s. Without the limit one
        # every poll that saw a new SYN timeout.
        assert 1 <= len(confirms) <= 5, [e.get("ts") for e in confirms]
        assert len(limited) == 1
        # The kernel's marks: the victim is suspect at most one window in
        # five, so root's connects still reach it (without the limit a mark
        # at every RTO kept it suspect nearly all the time: 0.058 measured).
        assert not [g for g in phase_a if g.startswith("error")], phase_a
        assert share >= fair / 2, (share, fair)
        # The real black hole: out, dead, as fast as without a local user
        # (a steered SYN's 100 ms RTO, the poll, a 200 ms confirm connect).
        assert down["kind"] == "dead", down
        assert detected_s < 1.5, detected_s
