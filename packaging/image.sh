#!/usr/bin/env bash
# Build the container image (packaging/Containerfile) without any registry,
# and check it by running the daemon from it (tests/test_image.py).
#
#   packaging/image.sh build     the image, tagged localhost/prism-kernel:VERSION
#   packaging/image.sh check     build, then run tests/test_image.py against it
#   packaging/image.sh clean     remove the images, the base and the storage
#
# No registry is reachable from the development machines, so the base image
# is a Debian bookworm root filesystem made by mmdebstrap from the Debian
# archive (minbase, merged /usr, no docs/man/locales: the size of
# debian:bookworm-slim), imported into podman. Everything lives in a storage
# of its own (STATE below), apart from any other podman use on the machine.
#
# podman runs with runc and cgroupfs: crun (podman's default on Debian)
# refuses hosts with cgroups in hybrid mode, and the ulimits are set
# explicitly because a root without CAP_SYS_RESOURCE (a sandbox) cannot raise
# them to podman's defaults. Needs root (packaging/dev.sh image installs the
# Debian packages: podman buildah runc mmdebstrap).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${PRISM_KERNEL_IMAGE_STATE:-/var/tmp/prism-kernel-image}"
RUNROOT="/run/prism-kernel-image-podman"
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/pyproject.toml")"
IMAGE="localhost/prism-kernel:$VERSION"
BASE="localhost/prism-kernel-base:bookworm"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org}"

podman_() {
  podman --root "$STATE/storage" --runroot "$RUNROOT" --storage-driver overlay \
    --runtime runc --cgroup-manager cgroupfs "$@"
}
ULIMITS=(--ulimit "nofile=16384:16384" --ulimit "nproc=8192:8192")

die() { echo "image.sh: $*" >&2; exit 1; }

base() {
  mkdir -p "$STATE"
  # Rebuilt once a day: security updates reach the image.
  if [ ! -s "$STATE/base.tar" ] || [ -n "$(find "$STATE/base.tar" -mmin +1440)" ]; then
    echo "image.sh: mmdebstrap bookworm -> $STATE/base.tar"
    mmdebstrap --variant=minbase --mode=root --format=tar --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
      --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
      bookworm "$STATE/base.tar.tmp" \
      "deb $MIRROR/debian bookworm main" "deb $MIRROR/debian bookworm-updates main" \
      "deb $MIRROR/debian-security bookworm-security main" > "$STATE/mmdebstrap.log" 2>&1 \
      || { tail -20 "$STATE/mmdebstrap.log" >&2; die "mmdebstrap failed (log: $STATE/mmdebstrap.log)"; }
    mv -f "$STATE/base.tar.tmp" "$STATE/base.tar"
    podman_ rmi -f "$BASE" >/dev/null 2>&1 || true
  fi
  if ! podman_ image exists "$BASE"; then
    podman_ import --change 'CMD ["/bin/bash"]' "$STATE/base.tar" "$BASE" > "$STATE/import.log" 2>&1 \
      || { cat "$STATE/import.log" >&2; die "podman import failed"; }
  fi
}

build() {
  for tool in podman runc mmdebstrap; do
    command -v "$tool" >/dev/null || die "$tool not found (packaging/dev.sh image installs it)"
  done
  base
  local secret=()
  # Behind a TLS-intercepting proxy (as on the development machines) pip in
  # the builder stage needs the machine's CA bundle: a build secret, never
  # part of the image.
  [ -s /etc/ssl/certs/ca-certificates.crt ] && secret=(--secret "id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt")
  local t0=$SECONDS
  podman_ build --network host --pull=never "${ULIMITS[@]}" "${secret[@]}" \
    --build-arg "BASE=$BASE" -f "$REPO/packaging/Containerfile" -t "$IMAGE" "$REPO" > "$STATE/build.log" 2>&1 \
    || { tail -30 "$STATE/build.log" >&2; die "podman build failed (log: $STATE/build.log)"; }
  podman_ image prune -f >/dev/null  # the builder stage
  echo "image.sh: built $IMAGE in $((SECONDS - t0)) s: $(podman_ image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}') (base $(podman_ image inspect --format '{{.Size}}' "$BASE" | awk '{printf "%.0f MB", $1/1e6}'))"
}

# podman's cgroupfs manager leaves empty cgroups (libpod_parent, and conmon
# in it) in every hierarchy; removed, innermost first, once no process is in
# them (rmdir refuses a cgroup that has one).
drop_cgroups() {
  local d
  for d in /sys/fs/cgroup/libpod_parent /sys/fs/cgroup/*/libpod_parent; do
    if [ -d "$d" ]; then find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true; fi
  done
}

check() {
  build
  # The test drives podman through the same storage and options.
  cd "$REPO"
  local rc=0
  PRISM_KERNEL_IMAGE="$IMAGE" PRISM_KERNEL_IMAGE_STATE="$STATE" PRISM_KERNEL_IMAGE_RUNROOT="$RUNROOT" \
    flock /run/prism-kernel-hosttests.lock "${PYTHON:-$REPO/.venv/bin/python}" -m pytest -p no:cacheprovider \
    tests/test_image.py "$@" || rc=$?
  drop_cgroups
  return $rc
}

clean() {
  if [ -d "$STATE/storage" ]; then
    podman_ rm -af >/dev/null 2>&1 || true
    podman_ rmi -af >/dev/null 2>&1 || true
  fi
  # Never rm -rf through a mount (an overlay of a container still up).
  if findmnt -rno TARGET | grep -q "^$STATE/"; then
    die "mounts left under $STATE: $(findmnt -rno TARGET | grep "^$STATE/" | tr '\n' ' ')"
  fi
  rm -rf "$STATE" "$RUNROOT"
  drop_cgroups
  echo "image.sh: removed $STATE"
}

cmd="${1:-build}"; shift || true
case "$cmd" in
  build) build ;;
  check) check "$@" ;;
  clean) clean ;;
  podman) podman_ "$@" ;;
  *) die "unknown command '$cmd' (build|check|clean|podman)" ;;
esac
