"""Configuration: every invalid value gives one clear error naming the field,
exit code 2, and nothing in the kernel touched."""

import json
import os
import subprocess
import sys

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
    ({"port": "x"}, "port (--port)", "valid integer"),
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


def _kernel_snapshot():
    """What a bad invocation must not change: nft ruleset, BPF programs and
    cgroup attachments, the sysctl the nftables path sets."""
    snap = {}
    nft = subprocess.run(["nft", "-j", "list", "ruleset"], capture_output=True, text=True)
    snap["nft"] = nft.stdout
    progs = subprocess.run(["bpftool", "-j", "prog", "list"], capture_output=True, text=True)
    snap["bpf_progs"] = sorted(p["id"] for p in json.loads(progs.stdout or "[]"))
    snap["route_localnet"] = open("/proc/sys/net/ipv4/conf/all/route_localnet").read()
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
    before = _kernel_snapshot()
    proc = subprocess.run([sys.executable, "-m", "prism_kernel", "run", *argv],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert "invalid configuration" in proc.stderr
    assert _kernel_snapshot() == before


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
