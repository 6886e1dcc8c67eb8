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


def pytest_ignore_collect(collection_path, config):
    # With a marker selection that names `guest`, only modules that declare
    # the marker are imported: others cannot hold a selected test, and their
    # module-level skips (e.g. test_image.py without an image) would be
    # listed in every kernel's summary as noise.
    if "guest" not in (config.option.markexpr or ""):
        return None
    if collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    try:
        return "pytest.mark.guest" not in collection_path.read_text() or None
    except OSError:
        return None
