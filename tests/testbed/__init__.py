"""The test cluster: fake Kubernetes API servers on separate "hosts" (network
namespaces joined to the host by veth pairs). See README.md in this directory.

    from tests.testbed import Testbed, FakeApiServer, clear_stale

Imports are lazy so that the server process (``python -m tests.testbed.fakeapi``)
starts without loading the host-side machinery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["Testbed", "FakeApiServer", "clear_stale", "TestbedError", "DEFAULT_PREFIX"]

if TYPE_CHECKING:  # pragma: no cover
    from tests.testbed._sys import TestbedError
    from tests.testbed.core import DEFAULT_PREFIX, FakeApiServer, Testbed, clear_stale


def __getattr__(name: str):
    if name in ("Testbed", "FakeApiServer", "clear_stale", "DEFAULT_PREFIX"):
        from tests.testbed import core

        return getattr(core, name)
    if name == "TestbedError":
        from tests.testbed._sys import TestbedError

        return TestbedError
    raise AttributeError(f"module 'tests.testbed' has no attribute {name!r}")
