"""pytest fixtures of the testbed, for tests/conftest.py to import:

    from tests.testbed.fixtures import testbed, testbed_cleanup, testbed_factory  # noqa: F401

- ``testbed_cleanup`` (session): clears what an interrupted earlier run left
  (``clear_stale``) once before the first testbed test, and once after the last.
- ``testbed`` (function): an open ``Testbed(n_backends=3, prefix="pkt")``.
- ``testbed_factory`` (function): ``make(n_backends=3, **kwargs)`` opens a
  Testbed with other settings; closed at the end of the test.

They skip the test when not running as root.
"""

from __future__ import annotations

import os

import pytest

from tests.testbed import Testbed, clear_stale

PREFIX = "pkt"


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the testbed needs root (network namespaces, veths, nftables)")


@pytest.fixture(scope="session")
def testbed_cleanup():
    _need_root()
    clear_stale(PREFIX)
    yield
    clear_stale(PREFIX)


@pytest.fixture
def testbed(testbed_cleanup):
    with Testbed(n_backends=3, prefix=PREFIX) as tb:
        yield tb


@pytest.fixture
def testbed_factory(testbed_cleanup):
    opened: list[Testbed] = []

    def make(n_backends: int = 3, **kwargs) -> Testbed:
        kwargs.setdefault("prefix", PREFIX)
        tb = Testbed(n_backends=n_backends, **kwargs)
        tb.open()
        opened.append(tb)
        return tb

    yield make
    for tb in reversed(opened):
        tb.close()
