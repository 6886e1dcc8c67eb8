"""Files prism-kernel ships beside its code: the BPF object and source, the
nftables ruleset template."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def data_file(*parts: str) -> Path:
    """prism_kernel/<parts> of an installed package (setup.py copies the
    files there when it builds), else <checkout>/<parts> of a source tree,
    where an editable install finds them (bpf/, nft/)."""
    packaged = resources.files("prism_kernel").joinpath(*parts)
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[1].joinpath(*parts)
