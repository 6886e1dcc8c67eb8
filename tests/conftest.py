"""Shared fixtures. Kernel state outlives processes, so: a session first
clears what an interrupted earlier run left (test hosts, the test instance's
nft table and BPF programs), every test that creates kernel state removes it
also when it fails, and the session checks at its end that nothing is left."""

from __future__ import annotations

import os

import pytest

from tests.harness import TEST_INSTANCE, cleanup_instance, kernel_leftovers

TESTBED_PREFIX = "pkt"


def _clear_everything() -> None:
    from tests.testbed import clear_stale

    cleanup_instance(TEST_INSTANCE)
    clear_stale(TESTBED_PREFIX)


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
