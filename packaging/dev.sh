#!/usr/bin/env bash
# One entry point for a fresh Debian 12 machine (run as root):
#   packaging/dev.sh demo    install everything, then run the demo
#   packaging/dev.sh test    install everything, then run the test suite
#   packaging/dev.sh bench   install everything, then run the benchmark
#   packaging/dev.sh bench-failover   ... then the failover benchmark
#   packaging/dev.sh bench-coldstart  ... then the cold-start benchmark
#   packaging/dev.sh bench-idle       ... then the idle daemon's CPU and RSS
#   packaging/dev.sh matrix  ... then the kernel matrix (packaging/kernel-matrix.sh ARGS)
#   packaging/dev.sh image   ... then build the container image, run it, remove it (packaging/image.sh)
#   packaging/dev.sh setup   install everything only
# Installing is idempotent and quick when already done.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
DEB_PACKAGES=(
  python3 python3-venv python3-pip
  libbpf1 bpftool                             # eBPF data path: loads the precompiled object
  clang libbpf-dev                            # ... builds it (bpf/build.sh), at setup only
  python3-bpfcc linux-headers-amd64           # the bcc fallback loader (ebpf.loader: bcc), tested too
  nftables python3-nftables                   # nftables data path
  iproute2 procps                             # test hosts in network namespaces
  openssl
  systemd shellcheck                          # tests check the unit file and the entrypoint script
)
# Only for the benchmark: load generator, userspace reference, backend.
BENCH_PACKAGES=(wrk haproxy nginx)
# Only for the kernel matrix: QEMU for the guests, depmod/modprobe for their
# kernels' modules (the kernels themselves are downloaded, never installed).
MATRIX_PACKAGES=(qemu-system-x86 kmod debian-archive-keyring)
# Only for the container image: podman (with runc: crun refuses hybrid cgroup
# hosts) and mmdebstrap for the base root filesystem (no registry needed).
IMAGE_PACKAGES=(podman runc mmdebstrap)

die() { echo "dev.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: the data paths and the test hosts need CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN"

install_debian_packages() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "dev.sh: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    # Debian starts a service on install (nginx on :80); the benchmark runs its
    # own instances, so a service we just installed is stopped and disabled.
    for svc in nginx haproxy; do
      if printf '%s\n' "${missing[@]}" | grep -qx "$svc" && command -v systemctl >/dev/null; then
        systemctl disable --now "$svc" >/dev/null 2>&1 || true
      fi
    done
  fi
}

# Only for the bcc fallback loader (the default path loads the precompiled
# object with libbpf and needs no headers): bcc needs kernel headers at
# /lib/modules/$(uname -r)/{build,source}. A kernel with no headers package of
# its own (like this VM's) works with any installed Debian headers, because
# cgroup sock_addr and sock_ops programs only use the stable uapi. A
# development-machine shortcut, not something for a production node. Never
# overwrite real headers.
link_kernel_headers() {
  local mod="/lib/modules/$(uname -r)"
  [ -e "$mod/build/Makefile" ] && [ -e "$mod/source" ] && return 0
  local arch common
  arch="$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1)"
  common="$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1)"
  [ -n "$arch" ] && [ -n "$common" ] || { echo "dev.sh: no kernel headers found; the eBPF data path will be unavailable" >&2; return 0; }
  mkdir -p "$mod"
  ln -sfn "$arch" "$mod/build"
  ln -sfn "$common" "$mod/source"
  echo "dev.sh: linked $mod/build -> $arch (for the bcc fallback loader only)"
}

make_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    # --system-site-packages: bcc and nftables come from Debian, not PyPI.
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
  fi
  if ! "$VENV/bin/python" -c "import prism_kernel, pydantic, pyroute2, prometheus_client, yaml, pytest, trustme" 2>/dev/null \
     || [ "$REPO/pyproject.toml" -nt "$VENV/.installed" ]; then
    "$VENV/bin/pip" install -q --disable-pip-version-check -e "$REPO[test]" 2>&1 | grep -v "^WARNING: Location" || true
    touch "$VENV/.installed"
  fi
}

# The BPF object is built when the package is installed, never when the
# daemon starts; rebuilt when its source changed.
build_bpf_object() {
  local obj="$REPO/bpf/prism_sock.bpf.o"
  if [ ! -e "$obj" ] || [ "$REPO/bpf/prism_sock.bpf.c" -nt "$obj" ] || [ "$REPO/bpf/build.sh" -nt "$obj" ]; then
    bash "$REPO/bpf/build.sh" "$obj"
  fi
}

setup() { install_debian_packages "${DEB_PACKAGES[@]}"; link_kernel_headers; build_bpf_object; make_venv; }

cmd="${1:-setup}"; shift || true
case "$cmd" in
  setup) setup ;;
  demo)  setup; exec "$VENV/bin/python" -m prism_kernel.demo "$@" ;;
  test)
    setup
    cd "$REPO"
    set +e
    "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
    rc=$?
    set -e
    # 5 = no tests collected: a broken collection, never a pass.
    [ $rc -eq 5 ] && echo "dev.sh: pytest collected no tests" >&2
    exit $rc ;;
  bench) setup; install_debian_packages "${BENCH_PACKAGES[@]}"; cd "$REPO"; exec "$VENV/bin/python" -m bench.run "$@" ;;
  bench-failover) setup; cd "$REPO"; exec "$VENV/bin/python" -m bench.failover "$@" ;;
  bench-coldstart) setup; cd "$REPO"; exec "$VENV/bin/python" -m bench.coldstart "$@" ;;
  bench-idle) setup; cd "$REPO"; exec "$VENV/bin/python" -m bench.idle "$@" ;;
  matrix) setup; install_debian_packages "${MATRIX_PACKAGES[@]}"; exec bash "$REPO/packaging/kernel-matrix.sh" "$@" ;;
  image)
    # Built, run, then removed (image, base root filesystem, storage: a few
    # hundred MB); packaging/image.sh build|check keeps them between runs.
    setup; install_debian_packages "${IMAGE_PACKAGES[@]}"
    rc=0; bash "$REPO/packaging/image.sh" check "$@" || rc=$?
    bash "$REPO/packaging/image.sh" clean
    exit $rc ;;
  *) die "unknown command '$cmd' (setup|demo|test|bench|bench-failover|bench-coldstart|bench-idle|matrix|image)" ;;
esac
