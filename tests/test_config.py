"""Configuration: every invalid value gives one clear error naming the field,
exit code 2, and nothing in the kernel touched."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prism_kernel.cli import main
from prism_kernel.config import build_config
from prism_kernel.errors import ConfigError

OK_PROBE = {"mode": "tcp"}


def cfg(**kw):
    data = {"endpoints": ["198.18.1.2:6443"], "probe": OK_PROBE}
    data.update(kw)
    return build_config(data, {})


def test_defaults():
    c = cfg()
    assert c.port == 7445 and c.datapath == "auto"
    assert c.probe.interval == 1.0 and c.probe.rise == 2 and c.probe.fall == 2
    assert str(c.state_dir) == "/run/prism-kernel"


def test_durations_accept_units():
    c = cfg(probe={"mode": "tcp", "interval": "500ms", "timeout": "2s"}, resolve_interval="1m")
    assert (c.probe.interval, c.probe.timeout, c.resolve_interval) == (0.5, 2.0, 60.0)


def test_flags_win_over_file():
    c = build_config(
        {"endpoints": ["198.18.1.2:6443"], "port": 1000, "probe": {"mode": "tcp", "rise": 5}},
        {"port": "2000", "endpoints": ["198.18.2.2:6443"], "probe": {"interval": "3", "rise": None}},
    )
    assert c.port == 2000
    assert [str(e) for e in c.endpoints] == ["198.18.2.2:6443"]
    assert c.probe.interval == 3 and c.probe.rise == 5 and c.probe.mode == "tcp"


@pytest.mark.parametrize("data,field,reason", [
    ({"bogus": 1}, "bogus", "unknown key"),
    ({"probe": {"mode": "tcp", "colour": "red"}}, "probe.colour", "unknown key"),
    ({"endpoints": []}, "endpoints (--endpoint)", "no endpoints"),
    ({"endpoints": "198.18.1.2:6443"}, "endpoints", "must be a list"),
    ({"endpoints": ["198.18.1.2"]}, "endpoints (--endpoint)", "no port"),
    ({"endpoints": ["300.1.1.1:6443"]}, "endpoints (--endpoint)", "not a valid IPv4"),
    ({"endpoints": ["198.18.1.2:6443", "198.18.1.2:6443"]}, "endpoints", "duplicate endpoints"),
    ({"port": 0}, "port (--port)", "greater than or equal to 1"),
    ({"port": 65536}, "port (--port)", "less than or equal to 65535"),
    ({"port": "x"}, "port (--port)", "must be an integer, not the string 'x'"),
    ({"probe": {"mode": "tcp", "interval": -1}}, "probe.interval (--probe-interval)", "greater than 0"),
    ({"probe": {"mode": "tcp", "interval": "1h"}}, "probe.interval", "not a duration"),
    ({"probe": {"mode": "tcp", "timeout": 0}}, "probe.timeout (--probe-timeout)", "greater than 0"),
    ({"probe": {"mode": "tcp", "rise": 0}}, "probe.rise (--probe-rise)", "greater than or equal to 1"),
    ({"probe": {"mode": "icmp"}}, "probe.mode (--probe)", "'tcp', 'tls' or 'readyz'"),
    ({"probe": {"mode": "tls", "ca_file": "/nonexistent/ca.pem"}}, "probe.ca_file (--ca-file)", "does not exist"),
    ({"probe": {"mode": "tls", "ca_file": "/etc"}}, "probe.ca_file", "is not a file"),
    ({"probe": {"mode": "tls", "ca_file": "/etc/hostname"}}, "probe.ca_file", "no usable PEM"),
    ({"probe": {"mode": "readyz"}}, "probe.mode 'readyz' (--probe)", "give probe.ca_file"),
    ({"probe": {"mode": "tcp", "client_cert_file": "/etc/hostname"}}, "probe", "must be given together"),
    ({"datapath": "ipvs"}, "datapath (--datapath)", "'auto', 'ebpf' or 'nftables'"),
    ({"probe": {"mode": "tcp", "interval": True}}, "probe.interval", "not a duration"),
    ({"probe": {"mode": "tcp", "server_name": "a\r\nX-Evil: 1"}}, "probe.server_name", "neither a DNS name"),
    ({"instance": "Bad Name"}, "instance (--instance)", "should match pattern"),
])
def test_invalid_values_name_field_and_reason(data, field, reason):
    with pytest.raises(ConfigError) as e:
        cfg(**data)
    text = str(e.value)
    assert field in text and reason in text, text


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        cfg(port=0, probe={"mode": "tcp", "interval": -1, "rise": 0})
    assert len(e.value.problems) == 3


def test_yaml_file_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("endpoints: [198.18.1.2:6443\n")
    assert main(["run", "--config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    assert main(["run", "--config", str(lst)]) == 2
    assert "top level must be a mapping" in capsys.readouterr().err
    assert main(["run", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "No such file" in capsys.readouterr().err


def test_yaml_file_loads(tmp_path):
    from prism_kernel.cli import _parser, config_from_args

    f = tmp_path / "c.yaml"
    f.write_text("endpoints:\n  - 198.18.1.2:6443\n  - '[2001:2::1]:6443'\nprobe:\n  mode: tcp\n  interval: 250ms\nport: 17445\n")
    c = config_from_args(_parser().parse_args(["run", "--config", str(f), "--probe-fall", "4"]))
    assert c.port == 17445 and c.probe.interval == 0.25 and c.probe.fall == 4
    assert [str(e) for e in c.endpoints] == ["198.18.1.2:6443", "[2001:2::1]:6443"]


def kernel_snapshot():
    """What a bad invocation must not change: nft ruleset, BPF programs, pins
    and cgroup attachments, the sysctls the nftables path sets."""
    snap = {}
    nft = subprocess.run(["nft", "-j", "list", "ruleset"], capture_output=True, text=True)
    snap["nft"] = nft.stdout
    progs = subprocess.run(["bpftool", "-j", "prog", "list"], capture_output=True, text=True)
    snap["bpf_progs"] = sorted(p["id"] for p in json.loads(progs.stdout or "[]"))
    cgroup = subprocess.run(["bpftool", "-j", "cgroup", "show", "/sys/fs/cgroup"], capture_output=True, text=True)
    snap["cgroup_attachments"] = sorted(map(json.dumps, json.loads(cgroup.stdout or "[]")))
    snap["route_localnet"] = open("/proc/sys/net/ipv4/conf/all/route_localnet").read()
    snap["tcp_timestamps"] = open("/proc/sys/net/ipv4/tcp_timestamps").read()
    snap["pins"] = sorted(os.listdir("/sys/fs/bpf")) if os.path.isdir("/sys/fs/bpf") else []
    return snap


@pytest.mark.kernel
@pytest.mark.parametrize("argv", [
    ["--endpoint", "198.18.1.2:99999", "--probe", "tcp"],
    ["--endpoint", "198.18.1.2:6443", "--probe", "tcp", "--port", "0"],
    ["--endpoint", "198.18.1.2:6443", "--probe-interval", "-1", "--probe", "tcp"],
    ["--endpoint", "198.18.1.2:6443", "--ca-file", "/nonexistent"],
    ["--endpoint", "198.18.1.2:6443", "--datapath", "magic", "--probe", "tcp"],
    ["--probe", "tcp"],
])
def test_cli_bad_input_exits_2_and_touches_nothing(argv):
    before = kernel_snapshot()
    proc = subprocess.run([sys.executable, "-m", "prism_kernel", "run", *argv],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert "invalid configuration" in proc.stderr
    assert kernel_snapshot() == before


def test_non_utf8_config_is_a_config_error(tmp_path):
    from prism_kernel.cli import _parser, config_from_args

    f = tmp_path / "bin.yaml"
    f.write_bytes(b"\xff\xfe endpoints")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config_from_args(_parser().parse_args(["run", "--config", str(f)]))


def test_a_non_mapping_section_in_the_file_is_not_hidden_by_flags():
    with pytest.raises(ConfigError, match="probe"):
        build_config({"endpoints": ["198.18.1.2:6443"], "probe": "bogus"}, {"probe": {"mode": "tcp"}})


@pytest.mark.parametrize("bad", ["", "..", "../etc", "A", "x/y"])
def test_instance_names_are_validated_on_every_command(bad):
    from prism_kernel.cli import _parser

    for cmd in ("status", "cleanup", "doctor"):
        with pytest.raises(SystemExit):
            _parser().parse_args([cmd, "--instance", bad])


# --------------------------------------------------------------------------
# strict types (issue 12 item 2): no bool-as-int, no text-as-number except
# durations; flags read by the type of their field


@pytest.mark.parametrize("data,problem", [
    ({"port": True}, "port (--port): must be an integer, not the boolean true"),
    ({"metrics": {"port": True}}, "metrics.port (--metrics-port): must be an integer, not the boolean true"),
    ({"probe": {"mode": "tcp", "rise": True}}, "probe.rise (--probe-rise): must be an integer, not the boolean true"),
    ({"probe": {"mode": "tcp", "fall": False}}, "probe.fall (--probe-fall): must be an integer, not the boolean false"),
])
def test_a_boolean_is_not_an_integer(data, problem):
    with pytest.raises(ConfigError) as e:
        cfg(**data)
    assert e.value.problems == [problem]


@pytest.mark.parametrize("data,field,expected", [
    ({"port": "7445"}, "port (--port)", "an integer, not the string '7445' (write the number without quotes)"),
    ({"port": 7445.0}, "port (--port)", "an integer, not the number 7445.0"),
    ({"probe": {"mode": "tcp", "jitter": "0.1"}}, "probe.jitter", "a number, not the string '0.1'"),
    ({"cleanup_on_exit": 1}, "cleanup_on_exit (--cleanup-on-exit)", "true or false, not the integer 1"),
    ({"probe": {"mode": "tcp", "insecure_skip_verify": "true"}}, "probe.insecure_skip_verify (--insecure-skip-verify)", "true or false"),
    ({"metrics": {"enabled": "false"}}, "metrics.enabled (--no-metrics)", "true or false, not the string 'false'"),
    ({"instance": 5}, "instance (--instance)", "a string, not the integer 5"),
    ({"probe": {"mode": "tcp", "jitter": float("nan")}}, "probe.jitter", "finite number"),
    ({"probe": {"mode": "tcp", "interval": float("inf")}}, "probe.interval (--probe-interval)", "finite number"),
    ({"probe": None}, "probe", "a mapping of keys, not null"),
])
def test_no_lax_conversions(data, field, expected):
    with pytest.raises(ConfigError) as e:
        cfg(**data)
    assert f"{field}: " in str(e.value) and expected in str(e.value), str(e.value)


def test_durations_keep_their_documented_text_forms():
    c = cfg(probe={"mode": "tcp", "interval": "2", "timeout": 1, "confirm_timeout": "300ms"},
            resolve_interval="1m", metrics={"heartbeat_timeout": 30})
    assert (c.probe.interval, c.probe.timeout, c.probe.confirm_timeout, c.resolve_interval) == (2.0, 1.0, 0.3, 60.0)
    assert c.metrics.heartbeat_timeout == 30.0


@pytest.mark.parametrize("flags,problem", [
    ({"port": "true"}, "port (--port): 'true' is not a whole number"),
    ({"port": "7445.0"}, "port (--port): '7445.0' is not a whole number"),
    ({"port": " 7445"}, "port (--port): ' 7445' is not a whole number"),
    ({"probe": {"rise": "\u0663"}}, "probe.rise (--probe-rise): '\u0663' is not a whole number"),  # Arabic-Indic 3
    ({"metrics": {"port": "1_000"}}, "metrics.port (--metrics-port): '1_000' is not a whole number"),
])
def test_integer_flags_take_ascii_digits_only(flags, problem):
    with pytest.raises(ConfigError) as e:
        build_config({"endpoints": ["198.18.1.2:6443"], "probe": OK_PROBE}, flags)
    assert problem in e.value.problems, e.value.problems


def test_flag_and_file_problems_are_reported_together():
    with pytest.raises(ConfigError) as e:
        build_config({"endpoints": ["198.18.1.2:6443"], "probe": {"mode": "tcp", "rise": True}},
                     {"port": "x", "metrics": {"port": "y"}})
    assert len(e.value.problems) == 3, e.value.problems


def test_integer_flags_become_integers():
    c = build_config({"endpoints": ["198.18.1.2:6443"], "probe": OK_PROBE},
                     {"port": "17445", "probe": {"rise": "3", "fall": "007"}, "metrics": {"port": "0"}})
    assert (c.port, c.probe.rise, c.probe.fall, c.metrics.port) == (17445, 3, 7, 0)


# --------------------------------------------------------------------------
# endpoints: normalised, duplicates rejected, limits, what a data path can serve


def test_endpoints_are_normalised():
    c = cfg(endpoints=["[2001:2:0:31:0:0:0:2]:8080", "CP.Example.COM.:6443", "https://198.18.31.2:8080/"])
    assert [str(e) for e in c.endpoints] == ["[2001:2:0:31::2]:8080", "cp.example.com:6443", "198.18.31.2:8080"]


@pytest.mark.parametrize("endpoints,expected", [
    (["[2001:2:0:31::2]:8080", "[2001:2:0:31:0:0:0:2]:8080"],
     "duplicate endpoints: [2001:2:0:31::2]:8080 (written '[2001:2:0:31::2]:8080' and '[2001:2:0:31:0:0:0:2]:8080')"),
    (["cp.example.com:6443", "CP.example.com.:6443"],
     "duplicate endpoints: cp.example.com:6443 (written 'cp.example.com:6443' and 'CP.example.com.:6443')"),
    (["198.18.1.2:6443", "https://198.18.1.2:6443"],
     "duplicate endpoints: 198.18.1.2:6443 (written '198.18.1.2:6443' and 'https://198.18.1.2:6443')"),
])
def test_the_same_endpoint_spelled_twice_is_rejected(endpoints, expected):
    with pytest.raises(ConfigError) as e:
        cfg(endpoints=endpoints)
    assert e.value.problems == [f"endpoints (--endpoint): {expected}"]


def _addresses(family, n):
    if family == 4:
        return [f"198.18.{i // 250}.{i % 250 + 1}:6443" for i in range(n)]
    return [f"[2001:2:0:{i:x}::2]:6443" for i in range(n)]


def test_the_endpoint_limits_are_what_both_data_paths_hold():
    from prism_kernel.config import MAX_BACKENDS_PER_FAMILY, MAX_ENDPOINT_ENTRIES
    from prism_kernel.datapath.ebpf.datapath import MAX_BACKENDS

    source = (Path(__file__).resolve().parent.parent / "bpf" / "prism_sock.bpf.c").read_text()
    assert f"#define PK_MAX_BACKENDS {MAX_BACKENDS_PER_FAMILY} " in source
    assert MAX_BACKENDS == MAX_BACKENDS_PER_FAMILY
    assert MAX_ENDPOINT_ENTRIES == 2 * MAX_BACKENDS_PER_FAMILY
    c = cfg(endpoints=_addresses(4, 64) + _addresses(6, 64))  # the most both families hold
    assert len(c.endpoints) == 128


@pytest.mark.parametrize("endpoints,expected", [
    (_addresses(4, 1000), "1000 endpoints: at most 128 entries (64 addresses per family"),
    (_addresses(4, 65), "65 IPv4 addresses: at most 64 per family"),
    (_addresses(6, 65), "65 IPv6 addresses: at most 64 per family"),
    ([f"cp{i}.example.com:6443" for i in range(129)], "129 endpoints: at most 128 entries"),
])
def test_more_endpoints_than_the_data_paths_hold_are_rejected(endpoints, expected):
    with pytest.raises(ConfigError) as e:
        cfg(endpoints=endpoints)
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(f"endpoints (--endpoint): {expected}")


def test_ipv6_only_endpoints_on_nftables_are_a_configuration_error():
    with pytest.raises(ConfigError) as e:
        cfg(datapath="nftables", endpoints=["[2001:2::2]:6443", "[2001:2::3]:6443"])
    assert e.value.problems == [(
        "datapath 'nftables' (--datapath) steers IPv4 only, and every endpoint is an IPv6 address: nothing "
        "could be steered; give an IPv4 endpoint or a DNS name, or use datapath ebpf")]
    # What can be served, or cannot be known before run time, stays valid.
    cfg(datapath="nftables", endpoints=["[2001:2::2]:6443", "198.18.1.2:6443"])
    cfg(datapath="nftables", endpoints=["[2001:2::2]:6443", "cp.example.com:6443"])
    cfg(datapath="ebpf", endpoints=["[2001:2::2]:6443"])
    cfg(datapath="auto", endpoints=["[2001:2::2]:6443"])


@pytest.mark.parametrize("endpoint", ["127.0.0.1:7445", "[::1]:7445"])
def test_the_listen_address_is_not_an_endpoint(endpoint):
    with pytest.raises(ConfigError) as e:
        cfg(endpoints=[endpoint])
    assert "is the listen address (port 7445) itself" in str(e.value)
    cfg(endpoints=[endpoint], port=17445)


def test_the_metrics_server_cannot_sit_on_the_listen_port():
    with pytest.raises(ConfigError, match=r"metrics.port \(--metrics-port\) 7445 is the listen port"):
        cfg(metrics={"port": 7445})
    cfg(metrics={"port": 7445, "address": "198.18.0.1"})  # an address the steering does not cover
    cfg(metrics={"port": 7445, "enabled": False})


# --------------------------------------------------------------------------
# the YAML document: bounded before and while it is parsed


def _run_config(tmp_path, capsys, text: str | bytes) -> tuple[int, str]:
    f = tmp_path / "c.yaml"
    if isinstance(text, bytes):
        f.write_bytes(text)
    else:
        f.write_text(text)
    rc = main(["run", "--config", str(f)])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("text,problem", [
    ("endpoints: " + "[" * 10_000 + "]" * 10_000 + "\n", "nested deeper than 16 levels"),
    ("".join("  " * i + "k:\n" for i in range(10_000)), "is larger than 64 KiB"),
    ("endpoints: [198.18.1.2:6443]\n" + "#" * 70_000 + "\n", "is larger than 64 KiB"),
    (("a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
      "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nendpoints: *c\n"), "more than 1024 values"),
    ("endpoints: &e [198.18.1.2:6443, *e]\n", "alias *e is inside its own anchor (a cycle)"),
    ("endpoints: [198.18.1.2:6443]\nport: 1\nport: 7445\n", "key 'port' is given twice"),
    ("endpoints: [198.18.1.2:6443]\ncleanup_on_exit: !!bool maybe\n", "cannot read bool value 'maybe'"),
    ("endpoints: [198.18.1.2:6443]\nport: " + "9" * 5000 + "\n", "cannot read int value"),
    ("endpoints: [198.18.1.2:6443]\nport: !!python/object:os.system x\n", "could not determine a constructor"),
])
def test_a_hostile_yaml_document_exits_2_naming_the_problem(tmp_path, capsys, text, problem):
    rc, err = _run_config(tmp_path, capsys, text)
    assert rc == 2 and problem in err and "Traceback" not in err, err
    assert err.startswith(f"prism-kernel: invalid configuration: config file '{tmp_path / 'c.yaml'}'"), err


def test_a_config_file_must_be_a_regular_file(tmp_path, capsys):
    assert main(["run", "--config", "/dev/zero"]) == 2  # would be read forever
    assert "config file '/dev/zero' is not a regular file" in capsys.readouterr().err
    assert main(["run", "--config", str(tmp_path)]) == 2
    assert "is not a regular file" in capsys.readouterr().err


def test_merge_keys_and_anchors_within_the_limits_still_work(tmp_path):
    from prism_kernel.cli import _parser, config_from_args

    f = tmp_path / "c.yaml"
    # A merge key's values may be overridden: that is what `<<` is for, not a key given twice.
    f.write_text("endpoints: [198.18.1.2:6443]\nprobe:\n  <<: {mode: tcp, rise: 3}\n  rise: 4\n"
                 "metrics: {port: &p 600}\ndiscovery: {watch_timeout: *p}\n")
    c = config_from_args(_parser().parse_args(["run", "--config", str(f)]))
    assert (c.probe.mode, c.probe.rise, c.metrics.port, c.discovery.watch_timeout) == ("tcp", 4, 600, 600.0)


@pytest.mark.kernel
@pytest.mark.parametrize("datapath", ["nftables", "ebpf"])
def test_the_endpoint_limit_fits_both_data_paths(datapath):
    """The validation limit is what each data path really holds: the most
    the configuration lets through is written and read back from the kernel
    (nftables steers IPv4 only; eBPF both families). `-s` prints the time of
    the set change."""
    import time

    from prism_kernel.config import MAX_BACKENDS_PER_FAMILY
    from prism_kernel.core.model import Backend
    from prism_kernel.datapath import datapath_class
    from prism_kernel.datapath.base import DatapathSettings
    from prism_kernel.errors import DatapathError
    from tests.harness import TEST_INSTANCE, TEST_PORT

    n = MAX_BACKENDS_PER_FAMILY
    v4 = [Backend.of(e.rsplit(":", 1)[0], 6443) for e in _addresses(4, n + 1)]
    v6 = [Backend.of(e.rsplit(":", 1)[0].strip("[]"), 6443) for e in _addresses(6, n)]
    most = v4[:n] + (v6 if datapath == "ebpf" else [])
    settings = DatapathSettings(listen_port=TEST_PORT, instance=TEST_INSTANCE)
    cls = datapath_class(datapath)
    dp = cls(settings)
    try:
        dp.install(most[:1])
        t = time.perf_counter()
        dp.apply(most)
        took = time.perf_counter() - t
        assert set(dp.read_state().backends) == set(most)
        print(f"{datapath}: 1 -> {len(most)} backends written in {took * 1000:.0f} ms")
        if datapath == "ebpf":
            with pytest.raises(DatapathError, match=f"at most {n} per family"):
                dp.apply(v4)  # one more: the maps cannot hold it
    finally:
        dp.close()
        cls.cleanup(settings)
