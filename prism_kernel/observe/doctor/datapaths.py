"""Checks of the data paths themselves: can each start here (eBPF: the real
programs loaded in a child with private maps, then freed; nftables: a
kernel dry run, never committed), and what `--datapath auto` would choose."""

from __future__ import annotations

from typing import Any

from prism_kernel.observe.doctor.check import FAIL, OK, WARN, Check, one_line


def check_datapath(name: str, port: int, instance: str) -> Check:
    from prism_kernel.datapath import DatapathSettings, datapath_class
    from prism_kernel.errors import DatapathUnavailable, PrismError

    settings = DatapathSettings(listen_port=port, instance=instance)
    cid = f"datapath.{name}"
    loaded: dict[str, Any] = {}
    try:
        cls = datapath_class(name)
        cls.check_available(settings)
        if name == "ebpf":
            loaded = cls.check_load(settings)
    except DatapathUnavailable as e:
        return Check(cid, WARN, f"{name} data path unavailable: {one_line(e.reason)}",
                     "see the checks above", needed_by=(name,), details={"reason": e.reason})
    except (PrismError, OSError) as e:
        return Check(cid, WARN, f"{name} data path check failed: {one_line(str(e))}", needed_by=(name,),
                     details={"reason": str(e)})
    what = {"ebpf": f"loaded the programs with {loaded.get('loader')} in a child, nothing attached "
                    f"or pinned ({loaded.get('why')}; {loaded.get('load_s')} s, peak RSS "
                    f"{loaded.get('maxrss_kb', 0) // 1024} MB)",
            "nftables": "the kernel accepted the ruleset in a dry run (nothing committed)"}[name]
    details = {k: v for k, v in loaded.items() if k in ("loader", "why", "load_s", "maxrss_kb", "failed_before")}
    return Check(cid, OK, f"{name} data path available: {what}", details=details)


def check_auto(port: int, instance: str) -> Check:
    from prism_kernel.datapath import DatapathSettings, choose
    from prism_kernel.errors import DatapathUnavailable, PrismError

    settings = DatapathSettings(listen_port=port, instance=instance)
    try:
        cls, why = choose("auto", settings)
    except DatapathUnavailable as e:
        return Check("auto", FAIL, f"no data path can run here: {one_line(e.reason)}",
                     "fix the checks marked fail above, then run doctor again",
                     details={"datapath": None, "reason": e.reason})
    except (PrismError, OSError) as e:
        return Check("auto", FAIL, f"no data path can run here: {one_line(str(e))}", "fix the checks above",
                     details={"datapath": None, "reason": str(e)})
    if cls.name == "ebpf":
        return Check("auto", OK, f"--datapath auto would use ebpf ({why}): connect() rewritten at the "
                     "cgroup root, no NAT, no conntrack", details={"datapath": "ebpf", "reason": why})
    return Check("auto", WARN, f"--datapath auto would use {cls.name} ({one_line(why)})",
                 "nftables works (DNAT + route_localnet, ~0.9x of direct); fix the eBPF checks above "
                 "for the faster, NAT-free path", details={"datapath": cls.name, "reason": why})

