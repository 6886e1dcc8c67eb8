"""Build hook (the rest of the metadata is in pyproject.toml): the BPF object
is compiled when the package is built or installed, never when the daemon
starts, and ships inside the package (prism_kernel/bpf/) with its source, the
bcc fallback's input, and the nftables ruleset template (prism_kernel/nft/);
prism_kernel/_data.py finds them. An editable install uses the source tree's
bpf/ and nft/ (packaging/dev.sh setup builds the object)."""

import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithBpfObject(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest = Path(self.build_lib) / "prism_kernel" / "bpf"
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run(["bash", str(HERE / "bpf" / "build.sh"), str(dest / "prism_sock.bpf.o")], check=True)
        shutil.copy2(HERE / "bpf" / "prism_sock.bpf.c", dest / "prism_sock.bpf.c")
        nft = Path(self.build_lib) / "prism_kernel" / "nft"
        nft.mkdir(parents=True, exist_ok=True)
        shutil.copy2(HERE / "nft" / "ruleset.json", nft / "ruleset.json")


setup(cmdclass={"build_py": BuildPyWithBpfObject})
