"""Shared fixtures. Kernel state outlives processes, so: a session first
clears what an interrupted earlier run left (test hosts, the test instance's
nft table and BPF programs), every test that creates kernel state removes it
also when it fails, and the session checks at its end that nothing is left.

Tests marked `kernel` need root with its capabilities; every other test runs
as any user (`pytest -m "not kernel"`). A session that selects a `kernel`
test without them stops before the first test, naming the tests and the
unprivileged command, instead of failing later on a refused syscall."""

from __future__ import annotations

import os

import pytest

from tests.harness import REPO, TEST_INSTANCE, cleanup_instance, kernel_leftovers

if not os.access(REPO, os.W_OK):
    # A read-only checkout (the unprivileged run): hypothesis keeps its example
    # database elsewhere rather than warn that .hypothesis/ cannot be created.
    os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", f"/tmp/prism-kernel-hypothesis-{os.getuid()}")

TESTBED_PREFIX = "pkt"


HOSTS_MARKER = "# prism-kernel-test"


def _clear_hosts_entries() -> None:
    """/etc/hosts lines a test added (names for the re-resolution test)."""
    try:
        lines = open("/etc/hosts").read().splitlines(keepends=True)
    except OSError:
        return
    kept = [ln for ln in lines if HOSTS_MARKER not in ln]
    if kept != lines:
        with open("/etc/hosts", "w") as f:
            f.writelines(kept)


def _clear_everything() -> None:
    from tests.exclusive_prog import detach_test_programs
    from tests.testbed import clear_stale

    detach_test_programs()  # first: while one is attached no eBPF path can attach at the root
    cleanup_instance(TEST_INSTANCE)
    clear_stale(TESTBED_PREFIX)
    _clear_hosts_entries()


# What the `kernel` tests use: netns and mounts, nftables, BPF loads and attaches.
KERNEL_CAPS = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}


def missing_privileges() -> list[str]:
    """Why this process cannot run `kernel` tests (empty: it can)."""
    missing = [] if os.geteuid() == 0 else ["root (euid 0)"]
    cap_eff = 0
    try:
        with open("/proc/self/status") as f:
            cap_eff = next((int(ln.split()[1], 16) for ln in f if ln.startswith("CapEff:")), 0)
    except OSError:
        pass
    return missing + [name for name, bit in KERNEL_CAPS.items() if not cap_eff >> bit & 1]


def _selected_kernel_tests(items) -> list:
    return [item for item in items if item.get_closest_marker("kernel")]


def pytest_collection_finish(session):
    """After -m/-k deselection: stop at once when `kernel` tests were selected
    and this process cannot run them."""
    if session.config.option.collectonly:
        return
    kernel = _selected_kernel_tests(session.items)
    missing = missing_privileges() if kernel else []
    if missing:
        shown = ", ".join(item.nodeid for item in kernel[:3]) + (", ..." if len(kernel) > 3 else "")
        pytest.exit(f"{len(kernel)} selected tests are marked `kernel` ({shown}) and need root with "
                    f"CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF and CAP_PERFMON; this process lacks: "
                    f"{', '.join(missing)}. Run them as root, or run the tests any user can: "
                    f"pytest -m \"not kernel\"", returncode=4)


@pytest.fixture(scope="session", autouse=True)
def _clean_machine(request):
    if not _selected_kernel_tests(request.session.items):
        yield
        return
    _clear_everything()
    yield
    _clear_everything()
    left = kernel_leftovers(TEST_INSTANCE)
    assert left == [], f"kernel state left after the session: {left}"


def _require_kernel_mark(request, what: str) -> None:
    """A test that creates kernel state must say so: unmarked, it would run in
    the unprivileged suite and skip the session's cleanup."""
    if request.node.get_closest_marker("kernel") is None:
        pytest.fail(f"{request.node.nodeid} uses {what} but is not marked `kernel` "
                    "(add pytestmark = pytest.mark.kernel)", pytrace=False)


@pytest.fixture
def testbed(request):
    """Three fake API servers on hosts in network namespaces; the test
    instance's kernel state is removed after the test, pass or fail."""
    _require_kernel_mark(request, "the testbed (network namespaces)")
    from tests.testbed import Testbed

    with Testbed(n_backends=3, prefix=TESTBED_PREFIX) as tb:
        try:
            yield tb
        finally:
            cleanup_instance(TEST_INSTANCE)


@pytest.fixture
def hosts_file(request):
    """Set test names in /etc/hosts (resolved by glibc without any DNS
    traffic); every line carries a marker and is removed afterwards."""
    _require_kernel_mark(request, "/etc/hosts (root)")

    def set_names(mapping: dict[str, list[str]]) -> None:
        _clear_hosts_entries()
        with open("/etc/hosts", "a") as f:
            for name, addrs in mapping.items():
                for a in addrs:
                    f.write(f"{a} {name} {HOSTS_MARKER}\n")

    try:
        yield set_names
    finally:
        _clear_hosts_entries()
