"""The kernel matrix: the data-path tests inside QEMU guests running Debian's
own kernels (docs/kernel-matrix.md). Host side, standard library only.

    python -m tests.matrix [--kernels 5.10,6.1,6.12] [--timeout S] [-- PYTEST ARGS]

For each kernel: the Debian package is fetched once from the Debian archive
with a private apt configuration (the host's apt sources are not touched) and
unpacked with dpkg-deb into the cache (/var/cache/prism-kernel-matrix); a small
initramfs (Debian's static busybox + the kernel's virtio/9p modules) mounts the
host's / read-only over 9p and starts tests/matrix/guest-init.sh, which runs
pytest as root and writes JUnit XML into a writable 9p directory; the guest
then powers off. No network device: the guest's only traffic is on its own
loopback and veths. A guest that does not boot, hangs or powers off without a
result fails its kernel with a message naming it.

Everything a run creates outside the cache (work directory, apt lists, the
QEMU process) is removed at its end, also on failure, timeout or SIGTERM; a
run first removes what an interrupted one left (and kills its QEMU, by the pid
it recorded)."""

from __future__ import annotations

import argparse
import fcntl
import lzma
import os
import re
import select
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("PKM_CACHE", "/var/cache/prism-kernel-matrix"))
WORK = Path(os.environ.get("PKM_WORK", "/run/prism-kernel-matrix"))
QEMU_MARK = "pkm-guest"  # QEMU's -name: how a leftover guest of ours is recognised

# series -> Debian suite whose linux-image-amd64 is that kernel (generic flavour:
# -cloud-amd64 has no 9p)
KERNELS = {"5.10": "bullseye", "6.1": "bookworm", "6.12": "trixie"}
DEFAULT_KERNELS = ("5.10", "6.1", "6.12")

# What the tests run in a guest: the data-path suites, without what depends on
# tight timing (a TCG guest runs several times slower than the host).
DEFAULT_SELECTION = ["-rfEs", "-m", "guest and not timing", "tests"]

# Modules the initramfs loads to reach the host's filesystem (those built in
# are skipped); dependencies are added from modules.dep.
INITRAMFS_MODULES = ["virtio_pci", "virtio_rng", "9pnet_virtio", "9p"]
# Loaded in the guest before the tests (the kernel would load most on demand).
GUEST_PRELOAD = ("veth nf_tables nft_chain_nat nf_nat nf_conntrack nft_ct nft_numgen nft_nat "
                 "nft_masq nft_reject_inet nf_conntrack_netlink inet_diag tcp_diag udp_diag")

MSIZE = 262144
BOOT_TIMEOUT = 180.0    # QEMU start -> guest-init up
DEFAULT_TIMEOUT = 1800.0  # QEMU start -> guest powered off, per kernel
MEMORY_MB = 3072


class MatrixError(Exception):
    pass


def log(msg: str) -> None:
    print(f"kernel-matrix: {msg}", flush=True)


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("timeout", 900)
    cp = subprocess.run(argv, capture_output=True, text=True, **kw)
    if cp.returncode != 0:
        raise MatrixError(f"{' '.join(argv[:4])}...: exit {cp.returncode}: {(cp.stderr or cp.stdout).strip()[-2000:]}")
    return cp


# --- kernels from the Debian archive -----------------------------------------------


@dataclass
class Kernel:
    series: str
    dir: Path

    @property
    def kver(self) -> str:
        return (self.dir / "KVER").read_text().strip()

    @property
    def package(self) -> str:
        return (self.dir / "PACKAGE").read_text().strip()

    @property
    def vmlinuz(self) -> Path:
        return self.dir / "root" / "boot" / f"vmlinuz-{self.kver}"

    @property
    def modules(self) -> Path:
        for base in ("lib", "usr/lib"):
            p = self.dir / "root" / base / "modules" / self.kver
            if p.is_dir() and not (self.dir / "root" / base).is_symlink():
                return p
        raise MatrixError(f"{self.series}: no modules directory in {self.dir}")


def debian_mirror() -> str:
    """The host's Debian mirror (its apt sources), e.g. http://deb.debian.org/debian."""
    if os.environ.get("PKM_DEBIAN_MIRROR"):
        return os.environ["PKM_DEBIAN_MIRROR"].rstrip("/")
    srcs = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for p in srcs:
        try:
            text = p.read_text()
        except OSError:
            continue
        for uri in re.findall(r"(?:^URIs:\s*|^deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", text, re.M):
            if re.search(r"/debian/?$", uri) and "security" not in uri:
                return uri.rstrip("/")
    return "http://deb.debian.org/debian"


def host_codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    raise MatrixError("no VERSION_CODENAME in /etc/os-release")


class PrivateApt:
    """apt-get/apt-cache with their own sources, lists and archives under a
    work directory: the host's sources and package state are never used or
    changed. Removed by the caller (it lives in the run's work directory)."""

    def __init__(self, workdir: Path, suites: list[str]):
        self.dir = workdir
        for d in ("lists/partial", "archives/partial", "cache", "etc", "debs"):
            (workdir / d).mkdir(parents=True, exist_ok=True)
        mirror = debian_mirror()
        keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
        (workdir / "etc/sources.list").write_text(
            "".join(f"deb [signed-by={keyring}] {mirror} {s} main\n" for s in suites))
        self.opts = []
        for k, v in {
            "Dir::Etc::SourceList": workdir / "etc/sources.list",
            "Dir::Etc::SourceParts": "/dev/null",
            "Dir::Etc::Preferences": "/dev/null",
            "Dir::Etc::PreferencesParts": "/dev/null",
            "Dir::State::Lists": workdir / "lists",
            "Dir::State::status": "/dev/null",
            "Dir::Cache": workdir / "cache",
            "Dir::Cache::Archives": workdir / "archives",
            "APT::Architectures::": "amd64",
            "APT::Sandbox::User": "root",
            "Acquire::Languages": "none",
            "Acquire::Retries": "3",
        }.items():
            self.opts += ["-o", f"{k}={v}"]
        log(f"apt: {mirror} {' '.join(suites)} (private lists in {workdir})")
        run(["apt-get", *self.opts, "-q", "update"])

    def show(self, pkg: str) -> list[dict[str, str]]:
        out = run(["apt-cache", *self.opts, "show", pkg]).stdout
        stanzas = []
        for block in out.strip().split("\n\n"):
            d = {}
            for line in block.splitlines():
                if ":" in line and not line.startswith(" "):
                    k, v = line.split(":", 1)
                    d[k] = v.strip()
            stanzas.append(d)
        return stanzas

    def download(self, spec: str) -> Path:
        debs = self.dir / "debs"
        before = set(debs.iterdir())
        run(["apt-get", *self.opts, "-q", "download", spec], cwd=debs)
        new = [p for p in debs.iterdir() if p not in before and p.suffix == ".deb"]
        if len(new) != 1:
            raise MatrixError(f"apt-get download {spec}: expected one .deb, got {new}")
        return new[0]


def image_package(apt: PrivateApt, series: str) -> tuple[str, str]:
    """linux-image-X-amd64 and its version for a series, from the meta package."""
    for st in apt.show("linux-image-amd64"):
        if st.get("Version", "").startswith(series + "."):
            m = re.match(r"(linux-image-\S+-amd64)\s*\(=\s*([^)]+)\)", st.get("Depends", ""))
            if m and "cloud" not in m.group(1):
                return m.group(1), m.group(2)
    raise MatrixError(f"kernel {series}: no generic linux-image-amd64 {series}.x in {KERNELS[series]}")


def unpack_kernel(apt: PrivateApt, series: str) -> Kernel:
    pkg, version = image_package(apt, series)
    log(f"kernel {series}: downloading {pkg} {version}")
    deb = apt.download(f"{pkg}={version}")
    part = CACHE / f"{series}.partial-{os.getpid()}"
    shutil.rmtree(part, ignore_errors=True)
    (part / "root").mkdir(parents=True)
    root = part / "root"
    run(["dpkg-deb", "-x", str(deb), str(root)])
    deb.unlink()
    kvers = sorted(p.name[len("vmlinuz-"):] for p in (root / "boot").glob("vmlinuz-*"))
    if len(kvers) != 1:
        raise MatrixError(f"kernel {series}: {pkg} has {len(kvers)} vmlinuz files")
    kver = kvers[0]
    # Its headers, for bcc (the fallback loader, and the earlier releases the
    # upgrade tests install): linux-headers-KVER and the -common package it needs.
    headers = f"linux-headers-{kver}"
    common = re.search(r"(linux-headers-\S+-common)\s*\(=\s*([^)]+)\)",
                       next((st.get("Depends", "") for st in apt.show(headers)), ""))
    if not common:
        raise MatrixError(f"kernel {series}: {headers} depends on no -common headers package")
    for spec in (f"{headers}={version}", f"{common.group(1)}={common.group(2)}"):
        hdeb = apt.download(spec)
        run(["dpkg-deb", "-x", str(hdeb), str(root)])
        hdeb.unlink()
    if not (root / "lib").exists() and (root / "usr/lib/modules").is_dir():
        (root / "lib").symlink_to("usr/lib")  # merged /usr (trixie): depmod -b looks in lib/
    moddir = (root / "lib/modules" / kver).resolve()
    # build/source point at /usr/src/... (or relative to /usr/lib/modules/KVER): in the
    # guest, /lib/modules/KVER is a bind mount of this directory, so they are made
    # absolute paths into the cache, which the guest sees at the same place.
    final_root = CACHE / series / "root"
    for name in ("build", "source"):
        link = moddir / name
        if not link.is_symlink():
            raise MatrixError(f"kernel {series}: {headers} has no lib/modules/{kver}/{name} link")
        target = os.readlink(link)
        inside = Path(os.path.normpath(target.lstrip("/") if target.startswith("/") else
                                       (moddir.relative_to(root.resolve()) / target)))
        if not (root / inside).is_dir():
            raise MatrixError(f"kernel {series}: {name} -> {target}: not in {headers}")
        link.unlink()
        link.symlink_to(final_root / inside)
    if not (root / "usr/src" / headers / "include/generated/autoconf.h").exists():
        raise MatrixError(f"kernel {series}: {headers} has no include/generated/autoconf.h")
    # The package ships no modules.dep (its postinst makes it): depmod on the unpacked tree.
    run(["depmod", "-b", str(root), kver])
    (part / "KVER").write_text(kver + "\n")
    (part / "PACKAGE").write_text(f"{pkg} {version}\n")
    final = CACHE / series
    shutil.rmtree(final, ignore_errors=True)
    part.rename(final)
    return Kernel(series, final)


def fetch(series_list: list[str], work: Path, refresh: bool) -> tuple[dict[str, Kernel], Path]:
    """Cached kernels and busybox; downloads only what the cache lacks."""
    CACHE.mkdir(parents=True, exist_ok=True)
    kernels = {s: Kernel(s, CACHE / s) for s in series_list}
    busybox = CACHE / "busybox"
    missing = [s for s, k in kernels.items() if refresh or not (k.dir / "PACKAGE").exists()]
    if missing or not busybox.exists():
        codename = host_codename()
        suites = sorted({KERNELS[s] for s in missing} | {codename})
        apt = PrivateApt(work / "apt", suites)
        try:
            for s in missing:
                kernels[s] = unpack_kernel(apt, s)
            if refresh or not busybox.exists():
                deb = apt.download(f"busybox-static/{codename}")
                tmp = work / "busybox-deb"
                run(["dpkg-deb", "-x", str(deb), str(tmp)])
                found = [p for p in (tmp / "bin/busybox", tmp / "usr/bin/busybox") if p.exists()]
                if not found:
                    raise MatrixError("busybox-static: no bin/busybox in the package")
                shutil.copy2(found[0], CACHE / "busybox.partial")
                (CACHE / "busybox.partial").rename(busybox)
                shutil.rmtree(tmp)
        finally:
            shutil.rmtree(work / "apt", ignore_errors=True)
    for s, k in kernels.items():
        log(f"kernel {s}: {k.package} ({k.kver}), cached in {k.dir}")
    return kernels, busybox


# --- initramfs ---------------------------------------------------------------------


class Cpio:
    """A newc archive (what the kernel unpacks as an initramfs)."""

    def __init__(self):
        self.parts: list[bytes] = []
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = [self.ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data), 0, 0,
                  rdev[0], rdev[1], len(name) + 1, 0]
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        self.parts += [hdr, b"\0" * (-len(hdr) % 4), data, b"\0" * (-len(data) % 4)]

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def bytes(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self.parts)


def _modname(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return re.sub(r"\.ko(\.xz|\.zst|\.gz)?$", "", base).replace("-", "_")


def boot_modules(moddir: Path, wanted: list[str]) -> list[Path]:
    """`wanted` and their dependencies, dependencies first; built-in ones left out."""
    deps: dict[str, list[str]] = {}
    paths: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[_modname(mod)] = [_modname(d) for d in rest.split()]
        paths[_modname(mod)] = mod
    builtin = {_modname(l) for l in (moddir / "modules.builtin").read_text().split()}
    order: list[str] = []

    def visit(m: str, depth: int = 0) -> None:
        if m in order or m in builtin:
            return
        if m not in deps or depth > 50:
            raise MatrixError(f"module {m} is neither in modules.dep nor built in ({moddir})")
        for d in deps[m]:
            visit(d, depth + 1)
        order.append(m)

    for m in wanted:
        visit(m)
    return [moddir / paths[m] for m in order]


def module_bytes(path: Path) -> bytes:
    if path.name.endswith(".xz"):
        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True, timeout=60).stdout
    return path.read_bytes()


def build_initramfs(kernel: Kernel, busybox: Path, dest: Path) -> None:
    c = Cpio()
    for d in ("bin", "dev", "modules", "proc", "sys", "newroot"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.file("bin/busybox", busybox.read_bytes(), 0o755)
    c.file("init", (HERE / "initramfs-init.sh").read_bytes(), 0o755)
    names = []
    for p in boot_modules(kernel.modules, INITRAMFS_MODULES):
        name = _modname(p.name) + ".ko"
        c.file(f"modules/{name}", module_bytes(p))
        names.append(name)
    c.file("modules/order", ("\n".join(names) + "\n").encode())
    conf = {"PKM_ROOT_TAG": "pkmroot", "PKM_MSIZE": str(MSIZE),
            "PKM_GUEST_INIT": str(HERE / "guest-init.sh")}
    c.file("pkm.conf", "".join(f"{k}={shlex.quote(v)}\n" for k, v in conf.items()).encode())
    dest.write_bytes(c.bytes())


# --- one guest -----------------------------------------------------------------------


@dataclass
class Result:
    series: str
    kver: str = "?"
    ok: bool = False
    message: str = ""
    boot_s: float | None = None
    tests_s: float | None = None
    total_s: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def qemu_argv(kernel: Kernel, initrd: Path, results: Path, cpus: int) -> list[str]:
    append = "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1 oops=panic loglevel=6 random.trust_cpu=on"
    return [
        "qemu-system-x86_64", "-name", f"{QEMU_MARK}-{kernel.series}",
        "-nodefaults", "-no-reboot", "-display", "none", "-monitor", "none", "-serial", "stdio",
        "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(cpus), "-m", str(MEMORY_MB),
        "-nic", "none",
        "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd), "-append", append,
        "-object", "rng-random,filename=/dev/urandom,id=rng0", "-device", "virtio-rng-pci,rng=rng0",
        "-virtfs", "local,path=/,mount_tag=pkmroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={results},mount_tag=pkmresults,security_model=none,multidevs=remap",
    ]


def run_guest(kernel: Kernel, busybox: Path, work: Path, pytest_args: list[str], timeout: float,
              boot_timeout: float, cpus: int, echo: bool) -> Result:
    res = Result(kernel.series, kernel.kver)
    gdir = work / kernel.series
    results = gdir / "results"
    results.mkdir(parents=True)
    initrd = gdir / "initramfs.cpio"
    build_initramfs(kernel, busybox, initrd)
    job = {"PKM_SERIES": kernel.series, "PKM_REPO": str(REPO), "PKM_PYTHON": pytest_python(),
           "PKM_MODULES": str(kernel.modules), "PKM_PRELOAD": GUEST_PRELOAD}
    (results / "job.env").write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in job.items()))
    if any("\n" in a for a in pytest_args):
        raise MatrixError("a pytest argument with a newline")
    args = ["-p", "tests.matrix.guest_plugin", *pytest_args]
    (results / "pytest.args").write_text("".join(a + "\n" for a in args))
    console = gdir / "console.log"

    argv = qemu_argv(kernel, initrd, results, cpus)
    log(f"kernel {kernel.series}: booting {kernel.kver} (TCG, {cpus} vCPUs, {MEMORY_MB} MiB)")
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    (work / f"qemu-{kernel.series}.pid").write_text(f"{proc.pid}\n")
    t_tests = None
    fails: list[str] = []
    try:
        with open(console, "wb") as out:
            buf = b""
            in_tests = False
            while True:
                now = time.monotonic()
                deadline = t0 + (timeout if res.boot_s is not None else min(timeout, boot_timeout))
                if now >= deadline:
                    what = f"kernel {kernel.kver} did not boot (no guest init)" if res.boot_s is None \
                        else "the guest timed out"
                    raise MatrixError(f"{what} after {now - t0:.0f} s (limit {deadline - t0:.0f} s: --timeout / --boot-timeout)")
                r, _, _ = select.select([proc.stdout], [], [], deadline - now)
                if not r:
                    continue
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break  # QEMU exited (the guest powered off, or QEMU failed)
                out.write(chunk)
                out.flush()  # the log can be followed while the guest runs
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    line = raw.decode(errors="replace").rstrip("\r")
                    if "PKM: guest-init up" in line and res.boot_s is None:
                        res.boot_s = time.monotonic() - t0
                        log(f"kernel {kernel.series}: guest up after {res.boot_s:.1f} s: {line.split('PKM: ', 1)[1]}")
                    elif "PKM: pytest start" in line:
                        t_tests, in_tests = time.monotonic(), True
                    elif "PKM: pytest done" in line and t_tests is not None:
                        res.tests_s, in_tests = time.monotonic() - t_tests, False
                    elif "PKM-FAIL:" in line:
                        fails.append(line.split("PKM-FAIL: ", 1)[1])
                    elif "PKM: " in line:
                        log(f"kernel {kernel.series}: {line.split('PKM: ', 1)[1]}")
                    if in_tests and echo and "PKM: " not in line:
                        print(f"[{kernel.series}] {line}", flush=True)
        try:
            proc.wait(timeout=max(1.0, t0 + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise MatrixError(f"QEMU did not exit after its console closed ({time.monotonic() - t0:.0f} s)")
        res.total_s = time.monotonic() - t0
        rc_file = results / "rc"
        if fails or (results / "error").exists():
            raise MatrixError("; ".join(fails) or (results / "error").read_text().strip())
        if res.boot_s is None:
            raise MatrixError(f"kernel {kernel.kver} did not boot: QEMU exited ({proc.returncode}: the guest "
                              f"reset or powered off) before the guest's init ran")
        if not rc_file.exists():
            raise MatrixError(f"the guest powered off without a test result (QEMU exit {proc.returncode})")
        rc = int(rc_file.read_text().strip())
        read_junit(results / "junit.xml", res)
        if rc == 5:
            raise MatrixError("pytest collected no tests")
        res.ok = rc == 0 and res.counts.get("passed", 0) > 0
        res.message = f"pytest exit {rc}"
    except MatrixError as e:
        res.ok = False
        res.message = str(e)
        tail = console.read_bytes().decode(errors="replace").splitlines()[-60:] if console.exists() else []
        log(f"kernel {kernel.series}: FAILED: {e}; last console lines:")
        for line in tail:
            print(f"  [{kernel.series} console] {line}", flush=True)
        if (results / "junit.xml").exists() and not res.counts:
            read_junit(results / "junit.xml", res)
    finally:
        stop_qemu(proc)
        (work / f"qemu-{kernel.series}.pid").unlink(missing_ok=True)
    return res


def stop_qemu(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        log(f"QEMU pid {proc.pid} did not die after SIGKILL")
    if proc.stdout:
        proc.stdout.close()


def read_junit(path: Path, res: Result) -> None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        res.message += f" (no readable JUnit XML: {e})"
        return
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "xfailed": 0}
    for tc in root.iter("testcase"):
        name = f"{tc.get('classname', '')}::{tc.get('name', '')}"
        kinds = {child.tag for child in tc}
        if "failure" in kinds:
            counts["failed"] += 1
            res.failed.append(f"FAILED {name}: {_first_line(tc, 'failure')}")
        elif "error" in kinds:
            counts["error"] += 1
            res.failed.append(f"ERROR {name}: {_first_line(tc, 'error')}")
        elif "skipped" in kinds and tc.find("skipped").get("type") == "pytest.xfail":
            counts["xfailed"] += 1  # a known failure on this kernel: listed, never hidden
            res.skipped.append(f"XFAIL {name}: {_first_line(tc, 'skipped')}")
        elif "skipped" in kinds:
            counts["skipped"] += 1
            res.skipped.append(f"SKIPPED {name}: {_first_line(tc, 'skipped')}")
        else:
            counts["passed"] += 1
    res.counts = counts


def _first_line(tc: ET.Element, tag: str) -> str:
    el = tc.find(tag)
    msg = (el.get("message") or el.text or "").strip() if el is not None else ""
    return msg.splitlines()[0][:300] if msg else ""


def pytest_python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    if not venv.exists():
        raise MatrixError(f"no {venv}: run packaging/dev.sh setup first")
    return str(venv)


# --- the run ---------------------------------------------------------------------------


def clear_leftovers(work: Path) -> None:
    """What an interrupted run left: its QEMU processes (by the pid each recorded,
    and only if that pid is still one of our guests), its work directory,
    half-unpacked cache entries."""
    if work.is_dir():
        for pidfile in work.glob("qemu-*.pid"):
            try:
                pid = int(pidfile.read_text().strip())
                pidfd = os.pidfd_open(pid)  # first: the checks below then hold for this process
            except (OSError, ValueError):
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if cmdline and cmdline[0].endswith(b"qemu-system-x86_64") and \
                        any(a.startswith(QEMU_MARK.encode()) for a in cmdline):
                    log(f"killing the guest an interrupted run left (pid {pid})")
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    # the pidfd is readable once the process has exited: wait for that, bounded
                    if not select.select([pidfd], [], [], 30)[0]:
                        raise MatrixError(f"the leftover guest (pid {pid}) did not exit after SIGKILL")
            except (ProcessLookupError, FileNotFoundError):
                pass
            finally:
                os.close(pidfd)
        shutil.rmtree(work)
    if CACHE.is_dir():
        for p in CACHE.glob("*.partial*"):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def preflight(cpus: int) -> None:
    if os.geteuid() != 0:
        raise MatrixError("run as root (the guests run the kernel tests as root)")
    for hidden in ("/run", "/dev", "/proc", "/sys"):  # the guest mounts its own there
        if REPO == Path(hidden) or Path(hidden) in REPO.parents:
            raise MatrixError(f"the repository {REPO} is under {hidden}, which a guest cannot see")
    for tool in ("qemu-system-x86_64", "apt-get", "dpkg-deb", "depmod"):
        if shutil.which(tool) is None:
            raise MatrixError(f"{tool} not found: run packaging/dev.sh matrix (it installs the matrix's packages)")


def summary(results: list[Result]) -> str:
    lines = ["", "kernel matrix summary:",
             f"  {'kernel':<7} {'version':<24} {'result':<6} {'boot s':>7} {'tests s':>8} {'total s':>8}  tests"]
    for r in results:
        c = r.counts
        counts = (f"{c.get('passed', 0)} passed, {c.get('failed', 0)} failed, {c.get('error', 0)} errors, "
                  f"{c.get('skipped', 0)} skipped" + (f", {c['xfailed']} xfailed" if c.get("xfailed") else "")
                  ) if c else "-"
        f = lambda v: f"{v:.1f}" if v is not None else "-"  # noqa: E731
        lines.append(f"  {r.series:<7} {r.kver:<24} {'PASS' if r.ok else 'FAIL':<6} {f(r.boot_s):>7} "
                     f"{f(r.tests_s):>8} {f(r.total_s):>8}  {counts}")
        if not r.ok:
            lines.append(f"          {r.message}")
        for x in r.failed:
            lines.append(f"          {x}")
        for x in r.skipped:
            lines.append(f"          {x}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kernel-matrix", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default=",".join(DEFAULT_KERNELS),
                   help=f"comma-separated series of {', '.join(KERNELS)} (default: all)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help="seconds per guest, boot to poweroff (default %(default)s)")
    p.add_argument("--boot-timeout", type=float, default=BOOT_TIMEOUT,
                   help="seconds from QEMU's start to the guest's init (default %(default)s)")
    p.add_argument("--cpus", type=int, default=min(2, os.cpu_count() or 1), help="vCPUs per guest")
    p.add_argument("--refresh", action="store_true",
                   help="look up the kernels in the archive again, even if cached")
    p.add_argument("--fetch-only", action="store_true", help="download and unpack, boot nothing")
    p.add_argument("--results", metavar="DIR", help="copy each guest's console log and JUnit XML here")
    p.add_argument("--quiet", action="store_true", help="do not echo the guests' pytest output")
    p.add_argument("--summary", metavar="FILE", help="also write the per-kernel summary to FILE")
    p.add_argument("pytest_args", nargs="*",
                   help=f"after --: pytest arguments replacing the default {shlex.join(DEFAULT_SELECTION)}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    series = [s.strip() for s in args.kernels.split(",") if s.strip()]
    unknown = [s for s in series if s not in KERNELS]
    if unknown or not series:
        print(f"kernel-matrix: unknown kernel(s) {unknown or series}; known: {', '.join(KERNELS)}", file=sys.stderr)
        return 2
    pytest_args = args.pytest_args or DEFAULT_SELECTION

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    results: list[Result] = []
    try:
        preflight(args.cpus)
        CACHE.mkdir(parents=True, exist_ok=True)
        lock = os.open(CACHE, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another kernel matrix holds {CACHE}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        clear_leftovers(WORK)
        WORK.mkdir(parents=True)
        try:
            kernels, busybox = fetch(series, WORK, args.refresh)
            if args.fetch_only:
                return 0
            for s in series:
                try:
                    r = run_guest(kernels[s], busybox, WORK, pytest_args, args.timeout, args.boot_timeout,
                                  args.cpus, not args.quiet)
                except MatrixError as e:
                    r = Result(s, kernels[s].kver, message=str(e))
                results.append(r)
                log(f"kernel {s}: {'PASS' if r.ok else 'FAIL'} ({r.message})")
                if args.results:
                    keep = Path(args.results) / s
                    keep.mkdir(parents=True, exist_ok=True)
                    for name in ("console.log", "results/junit.xml"):
                        if (WORK / s / name).exists():
                            shutil.copy2(WORK / s / name, keep / Path(name).name)
                shutil.rmtree(WORK / s, ignore_errors=True)
        finally:
            clear_leftovers(WORK)
            os.close(lock)
    except MatrixError as e:
        log(f"FAILED: {e}")
        report(results, args.summary, f"kernel matrix FAILED before every kernel ran: {e}")
        return 1
    except KeyboardInterrupt as e:
        log(f"interrupted ({e or 'SIGINT'}); everything it started is removed")
        report(results, args.summary, "kernel matrix interrupted")
        return 130
    report(results, args.summary)
    return 0 if results and all(r.ok for r in results) else 1


def report(results: list[Result], path: str | None, note: str = "") -> None:
    text = summary(results) + (f"\n  {note}" if note else "")
    print(text, flush=True)
    if path:
        Path(path).write_text(text.lstrip("\n") + "\n")


if __name__ == "__main__":
    sys.exit(main())
