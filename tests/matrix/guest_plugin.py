"""pytest plugin of the kernel matrix's guests (run.py passes
`-p tests.matrix.guest_plugin`; nothing on the host loads it)."""

from __future__ import annotations

import os


def pytest_report_header(config):
    return f"kernel matrix guest: Linux {os.uname().release} under QEMU TCG"


def pytest_sessionstart(session):
    # The daemon imports its netlink code (pyroute2) at start, on purpose (README:
    # the first abort of dead connections must not wait for it). Tests that
    # drive a data path directly import it at their first close_connections(),
    # which under TCG and 9p takes ~5 s and lands inside a timed section.
    from prism_kernel.datapath.base import import_netlink

    import_netlink()
