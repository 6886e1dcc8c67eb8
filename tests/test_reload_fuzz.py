"""SIGHUP reloads of invalid files against one running daemon, per data path.

Each file is one the validation refuses (the cases of issue 12 and
hypothesis-mutated configurations, checked with the same pure validation the
daemon runs); each must end in a `reload_rejected` line and change nothing:
afterwards the daemon still runs, the kernel still steers the same listen
port to test hosts only, a real connection to 127.0.0.1:PORT reaches one, and the original
file reloads as `changed=nothing` (the running configuration is the original).
"""

from __future__ import annotations

import copy
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from prism_kernel.cli import _parser, config_from_args
from prism_kernel.errors import ConfigError
from tests.harness import TEST_INSTANCE, TEST_PORT, Daemon, client_context, who
from tests.test_config_fuzz import keys, values

pytestmark = pytest.mark.kernel

EXAMPLES = 30          # hypothesis examples per data path, besides the named cases
BATCH_SECONDS = 60.0   # the whole batch of one data path must end within this


def _base(tb, datapath: str) -> dict:
    return {
        "endpoints": [b.endpoint for b in tb.backends],
        "port": TEST_PORT,
        "datapath": datapath,
        "instance": TEST_INSTANCE,
        "cleanup_on_exit": True,
        "probe": {"mode": "readyz", "ca_file": tb.ca_file, "interval": 0.2, "timeout": 0.5},
        "metrics": {"port": 0},  # any free port: never clash with a live daemon
    }


def _named_cases(base: dict) -> dict[str, str | bytes]:
    """The configuration cases of issue 12, as files."""
    def with_(**changes) -> str:
        doc = copy.deepcopy(base)
        for path, value in changes.items():
            *parents, leaf = path.split("__")
            node = doc
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        return yaml.safe_dump(doc)

    v6 = ["[2001:2:0:31::2]:8080", "[2001:2:0:31:0:0:0:2]:8080"]
    return {
        "port: true": with_(port=True),
        "port as text": with_(port=str(TEST_PORT)),
        "port as float": with_(port=float(TEST_PORT)),
        "metrics.port: true": with_(metrics__port=True),
        "probe.rise: true": with_(probe__rise=True),
        "1,000 endpoints": with_(endpoints=[f"198.18.{i // 250}.{i % 250 + 1}:6443" for i in range(1000)]),
        "65 IPv4 endpoints": with_(endpoints=[f"198.18.{i // 250}.{i % 250 + 1}:6443" for i in range(65)]),
        "one IPv6 endpoint spelled twice": with_(endpoints=base["endpoints"] + v6),
        "a URL with a path": with_(endpoints=base["endpoints"] + ["https://198.18.31.2:8080/healthz"]),
        "an http URL": with_(endpoints=base["endpoints"] + ["http://198.18.31.2:8080"]),
        "the listen address as an endpoint": with_(endpoints=base["endpoints"] + [f"127.0.0.1:{TEST_PORT}"]),
        "IPv6-only on nftables": with_(datapath="nftables", endpoints=v6[:1]),
        "10,000 levels deep": "endpoints: " + "[" * 10_000 + "]" * 10_000 + "\n",
        "an alias bomb": ("a: &a [x,x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
                          "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\nendpoints: *c\n"),
        "a key given twice": with_() + f"port: {TEST_PORT + 1}\n",
        "70 KiB": with_() + "#" * 70_000 + "\n",
        "not UTF-8": b"\xff\xfe" + with_().encode(),
        "an unknown key": with_(colour="red"),
    }


def _validate(conf: Path) -> ConfigError | None:
    """The daemon's own validation of the file, with the daemon's flags."""
    try:
        config_from_args(_parser().parse_args(["run", "--config", str(conf), "--log-format", "json"]))
    except ConfigError as e:
        return e
    return None


def _write(conf: Path, content: str | bytes) -> None:
    """Replace the file atomically: the daemon never reads half a file."""
    tmp = conf.with_suffix(".tmp")
    tmp.write_bytes(content if isinstance(content, bytes) else content.encode())
    os.replace(tmp, conf)


def _reload(d: Daemon, conf: Path, content: str | bytes) -> dict:
    """Write, SIGHUP, and return the daemon's answer to it."""
    _write(conf, content)
    mark = len(d.events())
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for ev in d.events()[mark:]:
            if ev.get("event") in ("reloaded", "reload_rejected", "reload_deferred", "reload_unsupported"):
                return ev
        assert d.proc.poll() is None, f"daemon exited {d.proc.returncode}:\n{d.log_path.read_text()}"
        time.sleep(0.02)
    raise AssertionError(f"no answer to SIGHUP within 15 s:\n{d.log_path.read_text()}")


@st.composite
def _mutations(draw, base: dict) -> str:
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from([None, "probe", "metrics"]))
        node = doc if section is None else doc.get(section)
        if not isinstance(node, dict):  # an earlier round replaced the section itself
            node = doc
        if draw(st.booleans()):
            node[draw(st.sampled_from(sorted(node)))] = draw(values)
        else:
            node[draw(keys)] = draw(values)
    return yaml.safe_dump(doc, allow_unicode=True)


@pytest.mark.parametrize("datapath", ["nftables", "ebpf"])
def test_invalid_reloads_are_rejected_and_steering_goes_on(testbed, datapath):
    tb = testbed
    ctx = client_context(tb.ca_file)
    conf = Path(tb.tmpdir) / "config.yaml"
    base = _base(tb, datapath)
    original = yaml.safe_dump(base)
    _write(conf, original)
    assert _validate(conf) is None
    d = Daemon([], datapath, None, tb.tmpdir, start=False)
    d.argv = [sys.executable, "-m", "prism_kernel", "run", "--config", str(conf), "--log-format", "json"]
    d.start()
    with d:
        d.wait_ready()  # the first set is written
        everyone = {b.endpoint for b in tb.backends}
        t0 = time.monotonic()
        answers: dict[str, dict] = {}

        for name, content in _named_cases(base).items():
            if name == "IPv6-only on nftables" and datapath != "nftables":
                continue  # eBPF steers IPv6: valid there
            answers[name] = _reload(d, conf, content)

        sent = []

        @settings(max_examples=EXAMPLES, deadline=None, database=None)
        @given(content=_mutations(base))
        def one(content):
            _write(conf, content)
            if _validate(conf) is not None:
                sent.append(content)
                ev = _reload(d, conf, content)
                assert ev["event"] == "reload_rejected", (content, ev)

        one()
        elapsed = time.monotonic() - t0
        print(f"{datapath}: {len(answers)} named cases and {len(sent)} fuzzed files rejected in {elapsed:.1f} s")
        assert len(sent) >= EXAMPLES // 2, "most mutations should be invalid"

        assert "port: true" in answers and "10,000 levels deep" in answers
        for name, ev in answers.items():
            assert ev["event"] == "reload_rejected", (name, ev)
            assert ev["reason"].startswith("invalid configuration") and ev["kept"] == "running configuration", ev
        assert not [e for e in d.events() if e.get("event") == "reloaded"]
        assert elapsed < BATCH_SECONDS, elapsed

        # Nothing changed: the kernel steers the listen address to the test
        # hosts (which of them depends on their latency tiers, which move
        # under load), a real connection through it reaches one, and the
        # original file is what runs.
        st_ = d.status()
        assert st_["daemon"]["running"] and st_["kernel"][datapath]["installed"]
        assert st_["state"]["listen_port"] == TEST_PORT
        assert set(st_["kernel"][datapath]["backends"]) <= everyone and st_["kernel"][datapath]["backends"]
        assert who(ctx) in {"be0", "be1", "be2"}
        ev = _reload(d, conf, original)
        assert (ev["event"], ev.get("changed")) == ("reloaded", "nothing"), ev
