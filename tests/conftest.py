"""Shared fixtures. Kernel state outlives processes, so: a session first
clears what an interrupted earlier run left (test hosts, the test instance's
nft table and BPF programs), every test that creates kernel state removes it
also when it fails, and the session checks at its end that nothing is left."""

from __future__ import annotations

import os

import pytest

from tests.harness import TEST_INSTANCE, cleanup_instance, kernel_leftovers

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


@pytest.fixture(scope="session", autouse=True)
def _clean_machine(request):
    kernel_tests = any(item.get_closest_marker("kernel") for item in request.session.items)
    if not kernel_tests:
        yield
        return
    if os.geteuid() != 0:
        pytest.exit("the kernel tests need root (CAP_BPF, CAP_NET_ADMIN): run them as root", returncode=4)
    _clear_everything()
    yield
    _clear_everything()
    left = kernel_leftovers(TEST_INSTANCE)
    assert left == [], f"kernel state left after the session: {left}"


@pytest.fixture
def testbed():
    """Three fake API servers on hosts in network namespaces; the test
    instance's kernel state is removed after the test, pass or fail."""
    from tests.testbed import Testbed

    with Testbed(n_backends=3, prefix=TESTBED_PREFIX) as tb:
        try:
            yield tb
        finally:
            cleanup_instance(TEST_INSTANCE)


@pytest.fixture
def hosts_file():
    """Set test names in /etc/hosts (resolved by glibc without any DNS
    traffic); every line carries a marker and is removed afterwards."""

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
