"""How the eBPF programs get into the kernel: the precompiled object with
libbpf on a node that has no kernel headers, no compiler and no bcc; the bcc
fallback when libbpf cannot load; a restart that adopts without loading."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

from prism_kernel.datapath.base import DatapathSettings
from prism_kernel.datapath.ebpf import loading
from prism_kernel.datapath.ebpf import maps as pkmaps
from prism_kernel.datapath.ebpf.datapath import EbpfDatapath
from prism_kernel.errors import DatapathError
from tests.harness import TEST_INSTANCE, TEST_PORT, Daemon, build_program, plain_backend, prism, tcp_connect

pytestmark = pytest.mark.kernel

# What a production node (Talos, Bottlerocket, COS) does not have, hidden in a
# private mount namespace: kernel headers, the compiler and its libraries,
# every C header, bcc's Python module and its library.
HIDDEN = ("/lib/modules", "/usr/src", "/usr/include", "/usr/lib/llvm-14",
          "/usr/lib/python3/dist-packages/bcc")


def _hidden_node(argv: list[str]) -> list[str]:
    """argv run in a new mount namespace with HIDDEN under empty tmpfs (and
    /dev/null over libbcc); it refuses to start when anything is still visible."""
    mounts = [f"mount -t tmpfs -o ro,size=4k pk-hidden {shlex.quote(p)}" for p in HIDDEN if os.path.isdir(p)]
    libdir = "/usr/lib/x86_64-linux-gnu"
    mounts += [f"mount --bind /dev/null {shlex.quote(os.path.join(libdir, f))}"
               for f in sorted(os.listdir(libdir)) if f.startswith("libbcc")]
    mounts = " && ".join(mounts)
    checks = ("! /usr/bin/python3 -c 'from bcc import BPF' 2>/dev/null"
              " && ! command -v clang >/dev/null && [ ! -e /usr/include/linux/bpf.h ]"
              ' && [ ! -e "/lib/modules/$(uname -r)" ]')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'{mounts} && {checks} && exec "$@"', "sh", *argv]


def test_a_node_without_headers_compiler_or_bcc_runs_the_ebpf_path(testbed):
    """`prism-kernel run --datapath ebpf` where neither kernel headers, nor
    clang, nor bcc exist: the precompiled object is loaded with libbpf and
    127.0.0.1:PORT is steered."""
    be = testbed.backends[0]
    with Daemon([f"{be.address}:{be.port}"], "ebpf", testbed.ca_file, testbed.tmpdir,
                wrap=_hidden_node([])) as d:
        d.wait_ready()
        start = next(e for e in d.events() if e.get("event") == "start")
        assert start["datapath"] == "ebpf", start
        d.wait_active({f"{be.address}:{be.port}"})
        st = d.status()
        assert st["kernel"]["ebpf"]["details"]["loader"] == "libbpf", st["kernel"]
        loaded = st["state"]["datapath_loader"]
        assert loaded["loader"] == "libbpf" and "precompiled object" in loaded["why"], loaded
        ready = d.wait_ready()
        assert ready["loader"] == "libbpf" and ready["maxrss_kb"] > 0, ready  # the start log says it too
        table = prism("status", "--instance", TEST_INSTANCE)
        assert "eBPF programs: libbpf (precompiled object" in table.stdout, table.stdout
        with tcp_connect("127.0.0.1", TEST_PORT) as s:
            assert s.getpeername() == ("127.0.0.1", TEST_PORT)  # steered, and translated back
    assert d.proc.returncode == 0


@pytest.fixture
def dp():
    made: list[EbpfDatapath] = []

    def make(**kw) -> EbpfDatapath:
        loader = kw.pop("loader", "auto")
        d = EbpfDatapath(DatapathSettings(listen_port=TEST_PORT, instance=TEST_INSTANCE,
                                          ebpf_loader=loader), **kw)
        made.append(d)
        return d

    try:
        yield make
    finally:
        for d in made:
            d.close()
        EbpfDatapath.cleanup(DatapathSettings(listen_port=TEST_PORT, instance=TEST_INSTANCE))


def _steered_to(backend) -> None:
    with tcp_connect("127.0.0.1", TEST_PORT) as s:
        s.sendall(b"GET /whoami HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")


VERIFIER_REJECTS = ("\tif (ctx->user_ip4 != PK_LOOPBACK4)\n\t\treturn 1;",
                    "\tif (ctx->user_ip4 != PK_LOOPBACK4)\n\t\treturn *(volatile int *)((char *)ctx + 4096);")


@pytest.mark.parametrize("broken", ["not-elf", "verifier"])
def test_auto_falls_back_to_bcc_when_libbpf_cannot_load(testbed, dp, tmp_path, monkeypatch, broken):
    """An object libbpf cannot open, or one the verifier rejects (an
    out-of-bounds read in connect4): `auto` compiles the good source with bcc,
    says why, and the meta map records the loader; a restart adopts that
    program without loading anything (bcc's hash counts under auto)."""
    source = loading.default_source().read_text()
    assert VERIFIER_REJECTS[0] in source
    if broken == "not-elf":
        prog = build_program(tmp_path, source, build=False)
    else:
        prog = build_program(tmp_path, source, object_text=source.replace(*VERIFIER_REJECTS, 1))
    d = dp(**prog)
    be = plain_backend(testbed.backends[0])
    d.install([be])
    assert d.last_load["loader"] == "bcc"
    assert "libbpf" in d.last_load["why"], d.last_load["why"]
    assert d.read_state().details["loader"] == "bcc"
    _steered_to(be)

    def no_loader(req, raise_on_error=True):
        raise AssertionError(f"a loader was started: {req}")

    with monkeypatch.context() as m:
        m.setattr(loading, "run_loader", no_loader)
        again = dp(**prog)
        assert again.install([be]) is True and again.last_load["why"].startswith("adopted")
    # with nothing installed, an explicit libbpf loader does not fall back
    d.close()
    EbpfDatapath.cleanup(DatapathSettings(listen_port=TEST_PORT, instance=TEST_INSTANCE))
    with pytest.raises(DatapathError, match="libbpf") as e:
        dp(loader="libbpf", **prog).install([be])
    assert "bcc (" not in str(e.value)


def test_a_restart_adopts_without_loading(testbed, dp, monkeypatch):
    """The attached program is current: a new EbpfDatapath (a restarted
    daemon) adopts it and starts no loader at all, whichever loader put it
    there."""
    be = plain_backend(testbed.backends[0])
    first = dp()
    first.install([be])
    ids = first.read_state().details["prog_ids"]

    def no_loader(req, raise_on_error=True):
        raise AssertionError(f"a loader was started: {req}")

    monkeypatch.setattr(loading, "run_loader", no_loader)
    again = dp()
    assert again.install([be]) is True
    assert again.last_load["why"].startswith("adopted")
    assert again.read_state().details["prog_ids"] == ids
    _steered_to(be)


def test_the_object_has_btf_and_no_kernel_dependency():
    """The shipped object: BPF ELF with BTF-defined maps (sk_storage needs BTF
    for its key and value) and nothing that needs a kernel's headers (no
    CO-RE relocations: .BTF.ext holds line info only)."""
    obj = loading.default_object()
    assert obj.exists(), "bpf/build.sh did not run (packaging/dev.sh setup builds the object)"
    r = subprocess.run(["bpftool", "btf", "dump", "file", str(obj)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    for name in ("pk_peers", "pk_config", "pk_commit", "pk_sets", "pk_slots", "pk_params"):
        assert f"'{name}'" in r.stdout, name
    assert "'.maps'" in r.stdout


def test_check_available_starts_no_loader(monkeypatch):
    """Choosing the data path probes the kernel in-process; the programs are
    loaded once, by install() (a bcc compile used to run here at every start)."""
    def no_loader(req, raise_on_error=True):
        raise AssertionError(f"a loader was started: {req}")

    monkeypatch.setattr(loading, "run_loader", no_loader)
    EbpfDatapath.check_available(DatapathSettings(listen_port=TEST_PORT, instance=TEST_INSTANCE))


def test_the_object_needs_no_kernel_btf():
    """No CO-RE relocations in .BTF.ext: libbpf never needs the running
    kernel's BTF (/sys/kernel/btf/vmlinux) to load the object, so it loads
    the same on every kernel."""
    import struct

    data = loading.default_object().read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2  # ELF64
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_off = sections[shstrndx][4]

    def name(sh):
        end = data.index(b"\0", names_off + sh[0])
        return data[names_off + sh[0]:end].decode()

    ext = next(sh for sh in sections if name(sh) == ".BTF.ext")
    off = ext[4]
    magic, _, _, hdr_len = struct.unpack_from("<HBBI", data, off)
    assert magic == 0xEB9F
    core_relo_len = struct.unpack_from("<I", data, off + 28)[0] if hdr_len >= 32 else 0
    assert core_relo_len == 0


def test_cookie_0_steers_the_initial_netns_only(testbed, dp, monkeypatch):
    """A kernel before 5.14 cannot tell the daemon its netns cookie: it writes
    0 and the programs compare with the initial network namespace
    (bpf_get_netns_cookie(NULL)). The host is steered; a connect to
    127.0.0.1:PORT inside another namespace is not (refused: nothing listens
    there), as with the daemon's own cookie."""
    monkeypatch.setattr(pkmaps, "host_netns_cookie", lambda: 0)
    d = dp()
    be = plain_backend(testbed.backends[0])
    d.install([be])
    assert d.read_state().details["host_netns_cookie"] == 0
    _steered_to(be)
    ns = testbed.backends[1].netns
    probe = ("import socket, sys\n"
             "try:\n    socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=3)\n"
             "except ConnectionRefusedError:\n    print('refused')\nelse:\n    print('connected')\n")
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", probe, str(TEST_PORT)],
                       capture_output=True, text=True, timeout=30)
    assert r.stdout.strip() == "refused", r.stdout + r.stderr
