"""Can the eBPF data path run here: capabilities, the cgroup v2 root, the
kernel's features (probed, never read off the version: distributions
backport) and a loader; and, for `doctor`, whether the verifier accepts the
programs."""

from __future__ import annotations

import os
import sys

from prism_kernel.datapath.base import DatapathSettings
from prism_kernel.datapath.ebpf import bpfsys as bpf
from prism_kernel.datapath.ebpf import loading
from prism_kernel.datapath.ebpf.cgroup import check_exclusive_attachments, find_cgroup2_root
from prism_kernel.datapath.ebpf.links import BPFFS, validate_instance
from prism_kernel.datapath.ebpf.maps import LAYOUT, SUSPECT_NS
from prism_kernel.errors import DatapathError, DatapathUnavailable

CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 12, 21, 39


def check_available(name: str, settings: DatapathSettings) -> None:
    """Raise DatapathUnavailable with the reason. In-process and cheap (no
    program of ours is loaded: install() would be the second load at every
    start); a verifier that rejects the object shows at install(), or in
    check_load()."""
    def unavailable(reason: str) -> DatapathUnavailable:
        return DatapathUnavailable(name, reason)

    if sys.platform != "linux":
        raise unavailable("needs Linux")
    try:
        bpf._nr()
    except OSError as e:
        raise unavailable(str(e)) from None
    try:
        validate_instance(settings.instance)
    except DatapathError as e:
        raise unavailable(str(e)) from None
    cap = bpf.cap_eff()
    if not (cap & (1 << CAP_SYS_ADMIN) or (cap & (1 << CAP_BPF) and cap & (1 << CAP_NET_ADMIN))):
        raise unavailable("missing capability: needs CAP_SYS_ADMIN, or CAP_BPF and "
                          "CAP_NET_ADMIN, to load and attach cgroup BPF programs")
    try:
        root = find_cgroup2_root()
    except DatapathError as e:
        raise unavailable(str(e)) from None
    if not os.path.isdir(BPFFS) and not os.path.isdir(os.path.dirname(BPFFS)):
        raise unavailable(f"no {BPFFS} to mount bpffs on")
    # Each probe loads a tiny program or sends a request that changes nothing.
    from prism_kernel.datapath.ebpf import features as bpf_features  # noqa: PLC0415

    missing = bpf_features.missing()
    if missing:
        raise unavailable("; ".join(missing))
    check_exclusive_attachments(root, name)  # another program's non-multi attach at the root
    loading.loader_plan(settings.ebpf_loader)  # raises when no loader can run here


def check_load(name: str, settings: DatapathSettings) -> dict:
    """Load the programs as install() would, with private maps, in the
    loader child, and let them go (nothing pinned, nothing attached): the
    first loader whose load succeeds, with why and what failed before."""
    failures = []
    for loader, why in loading.loader_plan(settings.ebpf_loader):
        req = {"loader": loader, "mode": "check", "layout": LAYOUT, "suspect_ns": SUSPECT_NS,
               "object": str(loading.default_object()), "source": str(loading.default_source())}
        res = loading.run_loader(req, raise_on_error=False)
        if res.get("ok"):
            res["why"] = why
            res["failed_before"] = failures
            return res
        failures.append(f"{loader} ({res.get('stage')}): {res.get('error')}")
    raise DatapathUnavailable(name, "no loader could load the programs: " + " | ".join(failures))
