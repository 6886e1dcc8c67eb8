"""The package as an operator installs it: a wheel built from this checkout,
installed (not editable) into a fresh venv outside the checkout, then
`prism-kernel doctor` and a smoke subset of the integration tests (install,
steer, failover of one backend, cleanup; both data paths) run against it,
with nothing of the checkout's `prism_kernel` importable."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[1]
SMOKE = [
    "tests/test_daemon.py::test_connections_reach_only_healthy_backends",
    "tests/test_daemon.py::test_stopped_backend_leaves_within_interval_x_fall_and_returns_after_rise",
    "tests/test_daemon.py::test_daemon_stop_leaves_the_datapath_and_cleanup_removes_it",
]


def _run(argv: list, timeout: float, cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert r.returncode == 0, f"{' '.join(map(str, argv))}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A venv outside the checkout with the wheel (and its test extra)
    installed; Debian's python3-nftables and bcc are seen through
    --system-site-packages, as in the systemd instructions."""
    root = tmp_path_factory.mktemp("installed")
    build = root / "build"
    shutil.copytree(REPO, build / "src", ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "bench", "*.o"))
    # The wheel is built from the sdist, as `python -m build` does: what the
    # sdist leaves out (bpf/build.sh, the C source, nft/) cannot reach it.
    # --no-build-isolation: setuptools from this venv, no download to build.
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", root / "sdist"], 300, build / "src")
    sdists = list((root / "sdist").glob("prism*-*.tar.gz"))
    assert len(sdists) == 1, sdists
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--disable-pip-version-check", "-q", "-w", root / "dist", sdists[0]], 300, root)
    wheels = list((root / "dist").glob("prism_kernel-*.whl"))
    assert len(wheels) == 1, wheels
    _run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", root / "venv"], 120, root)
    _run([root / "venv/bin/pip", "install", "-q", "--disable-pip-version-check",
          f"{wheels[0]}[test]"], 600, root)
    return root / "venv"


def test_the_wheel_carries_the_object_and_finds_it_outside_the_checkout(venv, tmp_path):
    r = _run([venv / "bin/python", "-c",
              "import json, prism_kernel; from prism_kernel.datapath.ebpf import datapath as ebpf; "
              "from prism_kernel.datapath.nft import datapath as nftables; "
              "print(json.dumps([prism_kernel.__file__, str(ebpf.default_object()), "
              "str(nftables.TEMPLATE_PATH)]))"], 60, tmp_path)
    pkg, obj, template = json.loads(r.stdout)
    site = str(venv / "lib")
    assert pkg.startswith(site) and obj.startswith(site) and template.startswith(site), (pkg, obj, template)
    assert Path(obj).is_file() and Path(template).is_file()
    assert not pkg.startswith(str(REPO))


def test_doctor_of_the_installed_package(venv, tmp_path):
    r = subprocess.run([venv / "bin/prism-kernel", "doctor", "--instance", "pk-wheel", "-o", "json"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    checks = {c["id"]: c for c in json.loads(r.stdout)["checks"]}
    assert checks["datapath.ebpf"]["verdict"] == "ok", checks["datapath.ebpf"]
    assert checks["datapath.ebpf"]["details"]["loader"] == "libbpf"
    assert checks["auto"]["details"]["datapath"] == "ebpf"


def test_smoke_subset_against_the_installed_package(venv, tmp_path):
    """The integration tests themselves, from a copy of tests/ beside no
    package: every `prism_kernel` they and their daemons import is the
    installed one."""
    shutil.copytree(REPO / "tests", tmp_path / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    # pyproject's pytest settings, without its pythonpath (the checkout)
    (tmp_path / "pytest.ini").write_text("[pytest]\ntimeout = 300\nmarkers =\n"
                                         "    kernel: needs root and touches kernel state\n")
    probe = _run([venv / "bin/python", "-c", "import prism_kernel; print(prism_kernel.__file__)"], 60, tmp_path)
    assert probe.stdout.startswith(str(venv / "lib")), probe.stdout
    r = subprocess.run([venv / "bin/python", "-m", "pytest", "-p", "no:cacheprovider", "-q",
                        "--rootdir", tmp_path, *SMOKE], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-12000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "failed" not in r.stdout, r.stdout[-2000:]
