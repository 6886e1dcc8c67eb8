"""The command line's own arguments: every value is read strictly, and a bad
one exits 2 naming the flag, before anything else runs."""

import pytest

from prism_kernel.cli import _parser, config_from_args, main
from prism_kernel.errors import ConfigError


@pytest.mark.parametrize("argv,flag", [
    (["doctor", "--port", "\u0661\u0662"], "--port"),  # Arabic-Indic digits: int() reads them as 12
    (["doctor", "--port", " 7445"], "--port"),
    (["doctor", "--port", "0"], "--port"),
    (["doctor", "--port", "65536"], "--port"),
    (["status", "--watch", "nan"], "--watch"),  # float() reads it; the loop would sleep(nan)
    (["status", "--watch", "inf"], "--watch"),
    (["status", "--watch", "0"], "--watch"),
    (["status", "--watch", "-1"], "--watch"),
    (["run", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_arguments_exit_2_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_good_arguments_are_read_as_their_types():
    assert _parser().parse_args(["doctor", "--port", "7445"]).port == 7445
    assert _parser().parse_args(["status", "--watch", "0.5"]).watch == 0.5
    assert _parser().parse_args(["status", "--watch"]).watch == 2.0


def _run_config(*flags):
    return config_from_args(_parser().parse_args(["run", "--endpoint", "198.18.1.2:6443", "--probe", "tcp", *flags]))


def test_run_flags_are_read_by_their_fields_type():
    c = _run_config("--port", "17445", "--probe-rise", "3", "--probe-interval", "250ms", "--metrics-port", "0")
    assert (c.port, c.probe.rise, c.probe.interval, c.metrics.port) == (17445, 3, 0.25, 0)


@pytest.mark.parametrize("flags,problem", [
    (["--port", "true"], "port (--port): 'true' is not a whole number"),
    (["--port", "1e3"], "port (--port): '1e3' is not a whole number"),
    (["--metrics-port", "7450.0"], "metrics.port (--metrics-port): '7450.0' is not a whole number"),
    (["--probe-fall", "two"], "probe.fall (--probe-fall): 'two' is not a whole number"),
    (["--probe-interval", "1h"], "probe.interval (--probe-interval): '1h' is not a duration"),
    (["--endpoint", "https://198.18.31.2:8080/healthz"], "a URL with a path, query or fragment"),
])
def test_run_flags_that_are_not_their_type_are_named(flags, problem):
    with pytest.raises(ConfigError) as e:
        _run_config(*flags)
    assert any(problem in p for p in e.value.problems), e.value.problems
