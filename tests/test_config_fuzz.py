"""Property-based fuzzing of the configuration file and the flags of `run`.

Any file content and any flag list gives a configuration or exit 2 with every
problem naming a key, a flag or the file: never a traceback. Validation is
pure (load_yaml, build_config and the argument parser), so the properties run
it directly, hundreds of examples in seconds; a handful of hostile files go
through `prism-kernel run` as a subprocess to show that nothing reaches the
kernel (marked `kernel`: it reads the ruleset and BPF state).
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prism_kernel.cli import _parser, config_from_args
from prism_kernel.config import FLAG_NAMES, Config, load_yaml
from prism_kernel.errors import ConfigError
from tests.test_config import kernel_snapshot

REPO = Path(__file__).resolve().parent.parent

FUZZ = settings(max_examples=300, deadline=2000, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# A valid configuration whose every key the mutations below can hit.
VALID = {
    "endpoints": ["198.18.1.2:6443", "[2001:2::2]:6443", "cp.example.com:6443"],
    "port": 17445,
    "datapath": "auto",
    "probe": {"mode": "tcp", "interval": "1s", "timeout": "500ms", "rise": 2, "fall": 2, "jitter": 0.1,
              "confirm_timeout": "300ms", "insecure_skip_verify": False, "server_name": "kubernetes"},
    "nftables": {"stable_tcp_timestamps": True},
    "ebpf": {"loader": "auto"},
    "metrics": {"enabled": True, "address": "127.0.0.1", "port": 0, "heartbeat_timeout": "30s"},
    "discovery": {"enabled": False, "namespace": "default", "service": "kubernetes", "watch_timeout": 300},
    "resolve_interval": 30,
    "cleanup_on_exit": False,
    "instance": "pk-fuzz",
    "log_format": "logfmt",
}


def _paths(model, prefix=()):
    for name, field in model.model_fields.items():
        yield prefix + (name,)
        sub = field.annotation
        if isinstance(sub, type) and hasattr(sub, "model_fields"):
            yield from _paths(sub, prefix + (name,))


KEY_PATHS = [".".join(p) for p in _paths(Config)]
FLAGS = sorted(set(FLAG_NAMES.values()))


def names_a_field(problem: str) -> bool:
    """A problem starts with the file, a key (with its flag) or an unknown
    key, or is a check across keys that names them."""
    return (problem.startswith(("config file ", "key "))
            or any(problem.startswith(p) for p in KEY_PATHS)
            or problem.endswith(": unknown key")
            or any(f"({flag})" in problem for flag in FLAGS))


def validate(path: Path, *flags: str) -> Config | ConfigError:
    """What `run` does before anything else: parse argv, read the file,
    validate. argparse's own errors (exit 2) are returned as a ConfigError
    with its message so the same property covers them."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = _parser().parse_args(["run", "--config", str(path), *flags])
    except SystemExit as e:
        assert e.code == 2, err.getvalue()
        assert "argument " in err.getvalue() or "unrecognized arguments" in err.getvalue(), err.getvalue()
        return ConfigError(err.getvalue().strip().splitlines()[-1])
    try:
        return config_from_args(args)
    except ConfigError as e:
        assert e.exit_code == 2
        for p in e.problems:
            assert names_a_field(p), p
        return e


# --------------------------------------------------------------------------
# strategies

INTERESTING_TEXT = [
    "", "500ms", "2s", "1m", "2", "-1", "0", "1e3", "nan", "inf", "7445", "true", "yes", "null", "0x1f",
    "198.18.1.2:6443", "[2001:2:0:31:0:0:0:2]:8080", "https://198.18.31.2:8080", "https://198.18.31.2:8080/x",
    "http://198.18.31.2:8080", "https://u@h:1", "127.0.0.1:17445", "[::1]:17445", "[fe80::1%eth0]:1",
    "CP.Example.com.:6443", "0.0.0.0:1", "198.18.1.2:\u00b2", "a" * 300, "/etc/hostname", "/", "/dev/zero",
    "nftables", "ebpf", "readyz", "tls", "json", "::", "::1", "0.0.0.0",
]
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(INTERESTING_TEXT),
)
keys = st.one_of(st.sampled_from([p.rsplit(".", 1)[-1] for p in KEY_PATHS]), st.text(max_size=10))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                      st.dictionaries(keys, inner, max_size=5)),
                      max_leaves=12)


def _leaf_paths(d, prefix=()):
    for k, v in d.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from _leaf_paths(v, prefix + (k,))


LEAF_PATHS = list(_leaf_paths(VALID))


@st.composite
def mutated_configs(draw):
    """VALID with 1-3 keys replaced, removed or added."""
    import copy

    doc = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(LEAF_PATHS))
        parent = doc
        for k in path[:-1]:
            parent = parent.get(k) if isinstance(parent, dict) else None
            if not isinstance(parent, dict):
                break
        if not isinstance(parent, dict):
            continue
        action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add", "endpoint"]))
        if action == "replace":
            parent[path[-1]] = draw(values)
        elif action == "delete":
            parent.pop(path[-1], None)
        elif action == "add":
            parent[draw(keys)] = draw(values)
        else:
            doc["endpoints"] = draw(st.lists(st.one_of(st.sampled_from(INTERESTING_TEXT), st.text(max_size=30)),
                                             max_size=6))
    return doc


yamlish = st.text(alphabet="[]{}:-&*!,|>?<%@`'\"#\n \tab01.\\", max_size=200)


def _write(tmp_path: Path, content: str | bytes) -> Path:
    f = tmp_path / "fuzz.yaml"
    if isinstance(content, bytes):
        f.write_bytes(content)
    else:
        f.write_text(content)
    return f


# --------------------------------------------------------------------------
# properties (pure)


@FUZZ
@given(doc=mutated_configs())
def test_fuzz_mutated_configurations(tmp_path, doc):
    validate(_write(tmp_path, yaml.safe_dump(doc, allow_unicode=True)))


@FUZZ
@given(content=st.one_of(st.text(max_size=300), yamlish, st.binary(max_size=300)))
def test_fuzz_arbitrary_file_content(tmp_path, content):
    validate(_write(tmp_path, content))


@FUZZ
@given(depth=st.integers(1, 3000), opener=st.sampled_from(["[", "{a: ", "- ", "a:\n"]),
       anchors=st.integers(1, 12), fanout=st.integers(1, 12))
def test_fuzz_deep_and_wide_documents(tmp_path, depth, opener, anchors, fanout):
    if opener == "- ":
        deep = "".join("  " * i + "- " + ("\n" if i < depth - 1 else "x\n") for i in range(depth))
    elif opener == "a:\n":
        deep = "".join("  " * i + "a:\n" for i in range(depth))
    else:
        closer = "]" if opener == "[" else "}"
        deep = "endpoints: " + opener * depth + closer * depth + "\n"
    laughs = "".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}" if i else "x"] * fanout) + "]\n"
                     for i in range(anchors))
    for content in (deep, laughs):
        result = validate(_write(tmp_path, content[:200_000]))
        assert isinstance(result, ConfigError)


SWITCHES = ["--discovery", "--insecure-skip-verify", "--cleanup-on-exit", "--no-metrics"]
VALUED = [f for f in FLAGS if f not in SWITCHES] + ["--kubeconfig"]
flag_lists = st.lists(
    st.one_of(st.sampled_from(SWITCHES),
              st.tuples(st.sampled_from(VALUED), st.one_of(st.sampled_from(INTERESTING_TEXT), st.text(max_size=30)))
              .map(lambda fv: f"{fv[0]}={fv[1]}"),
              st.text(max_size=12)),
    max_size=8)


@FUZZ
@given(flags=flag_lists)
def test_fuzz_flags(tmp_path, flags):
    conf = _write(tmp_path, yaml.safe_dump(VALID))
    validate(conf, *flags)


def test_validation_loads_no_kernel_code():
    """Validation is pure: reading and checking a configuration imports no
    data path, netlink or daemon module (so it cannot touch the kernel)."""
    code = (
        "import sys\n"
        "from prism_kernel.cli import _parser, config_from_args\n"
        "from prism_kernel.errors import ConfigError\n"
        "for argv in (['--endpoint', '198.18.1.2:6443', '--probe', 'tcp'], ['--port', 'true']):\n"
        "    try: config_from_args(_parser().parse_args(['run', *argv]))\n"
        "    except ConfigError: pass\n"
        "bad = [m for m in sys.modules if m.startswith(('prism_kernel.datapath', 'prism_kernel.control',\n"
        "       'prism_kernel.probing', 'pyroute2', 'nftables', 'bcc'))]\n"
        "print(','.join(bad))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""


def test_the_worst_documents_within_the_limits_parse_quickly(tmp_path):
    """SIGHUP parses the file inside the daemon: the slowest document the
    limits let through must stay far below a probe interval. `-s` prints."""
    from prism_kernel.config import MAX_CONFIG_BYTES, MAX_CONFIG_VALUES

    docs = {
        "one 64 KiB string": 'a: "' + "x" * (MAX_CONFIG_BYTES - 10) + '"\n',
        "64 KiB of comments": ("# " + "c" * 60 + "\n") * (MAX_CONFIG_BYTES // 63 - 1),
        f"{MAX_CONFIG_VALUES - 4} values in a flow list": "a: [" + ",".join(["1"] * (MAX_CONFIG_VALUES - 4)) + "]\n",
        "a block list at the value limit": "a:\n" + "  - 198.18.1.2:6443\n" * (MAX_CONFIG_VALUES - 4),
        "30,000 values (stopped at the limit)": "a: [" + ",".join(["1"] * 30_000) + "]\n",
    }
    worst = 0.0
    for name, text in docs.items():
        f = _write(tmp_path, text[:MAX_CONFIG_BYTES])
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            with contextlib.suppress(ConfigError):
                load_yaml(str(f))
            best = min(best, time.perf_counter() - t)
        print(f"{name}: {len(text[:MAX_CONFIG_BYTES])} bytes, {best * 1000:.1f} ms")
        worst = max(worst, best)
    assert worst < 0.5


# --------------------------------------------------------------------------
# through the real command: exit 2, no traceback, nothing in the kernel

HOSTILE = {
    "deep": "endpoints: " + "[" * 10_000 + "]" * 10_000 + "\n",
    "port-true": "endpoints: [198.18.1.2:6443]\nport: true\nprobe: {mode: tcp}\n",
    "ipv6-only-nftables": "endpoints: ['[2001:2::2]:6443']\ndatapath: nftables\nprobe: {mode: tcp}\n",
    "1000-endpoints": "endpoints:\n" + "".join(f"  - 198.18.{i // 250}.{i % 250 + 1}:6443\n" for i in range(1000))
                      + "probe: {mode: tcp}\n",
    "url-with-path": "endpoints: ['https://198.18.31.2:8080/healthz']\nprobe: {mode: tcp}\n",
    "alias-bomb": "a: &a [x,x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
                  "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\nendpoints: *c\n",
}


@pytest.mark.kernel
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_run_with_a_hostile_file_exits_2_and_touches_nothing(tmp_path, name):
    f = _write(tmp_path, HOSTILE[name])
    before = kernel_snapshot()
    proc = subprocess.run([sys.executable, "-m", "prism_kernel", "run", "--config", str(f), "--instance", "pk-test"],
                          capture_output=True, text=True, timeout=30, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("prism-kernel: invalid configuration") and "Traceback" not in proc.stderr
    assert kernel_snapshot() == before
