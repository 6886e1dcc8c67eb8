#!/bin/sh
# Entrypoint of the prism-kernel container image (packaging/Containerfile).
#
# bcc compiles the eBPF programs at run time and needs kernel headers at
# /lib/modules/$(uname -r)/build (and .../source). The image is built once but
# runs on every node's kernel, so the link is made here, at start:
#
#   1. the node's own headers, when it has them: the DaemonSet mounts the
#      host's /lib/modules and /usr/src read-only at /host/lib/modules and
#      /host/usr/src (not at /lib/modules: the container's /lib/modules must
#      stay writable for the link, and /usr/src must keep the image's headers);
#   2. otherwise the Debian linux-headers-amd64 shipped in the image. The
#      programs (cgroup sock_addr) use only the stable uapi, so any recent
#      headers compile them for any kernel: the same step as
#      packaging/dev.sh link_kernel_headers.
#   3. neither: the eBPF data path is unavailable and `--datapath auto` falls
#      back to nftables (the daemon logs why).
#
# Then: exec prism-kernel "$@" (default: run --config /etc/prism-kernel/config.yaml).
#
# PRISM_KERNEL_ENTRYPOINT_ROOT prefixes every path above; only the tests set it
# (tests/test_packaging.py runs this script against a fake tree).
set -eu

root="${PRISM_KERNEL_ENTRYPOINT_ROOT:-}"
release="$(uname -r)"
mod="$root/lib/modules/$release"
host_mod="$root/host/lib/modules/$release"

log() { echo "prism-kernel-entrypoint: $*" >&2; }

# A host symlink target, seen from inside the container: absolute targets live
# under /host, relative ones are relative to the link's directory.
host_target() {
    t="$(readlink "$1" 2>/dev/null)" || return 1
    case "$t" in
        /*) echo "$root/host$t" ;;
        *) echo "$(dirname "$1")/$t" ;;
    esac
}

link_headers() {
    if [ -d "$mod/build/include" ]; then
        return 0  # already there (a rerun, or an image built for this kernel)
    fi
    mkdir -p "$mod"
    if [ -e "$host_mod/build" ] || [ -L "$host_mod/build" ]; then
        build="$(host_target "$host_mod/build" || echo "$host_mod/build")"
        if [ -d "$build/include" ]; then
            source="$build"
            if [ -L "$host_mod/source" ]; then
                s="$(host_target "$host_mod/source")"
                [ -d "$s" ] && source="$s"
            fi
            ln -sfn "$build" "$mod/build"
            ln -sfn "$source" "$mod/source"
            log "using the node's kernel headers: $mod/build -> $build"
            return 0
        fi
    fi
    arch="$(find "$root/usr/src" -maxdepth 1 -name 'linux-headers-*-amd64' 2>/dev/null | sort -V | tail -1)"
    common="$(find "$root/usr/src" -maxdepth 1 -name 'linux-headers-*-common' 2>/dev/null | sort -V | tail -1)"
    if [ -n "$arch" ] && [ -n "$common" ]; then
        ln -sfn "$arch" "$mod/build"
        ln -sfn "$common" "$mod/source"
        log "the node has no headers for $release; using the image's: $mod/build -> $arch"
        return 0
    fi
    log "no kernel headers for $release: the eBPF data path is unavailable (auto uses nftables)"
}

link_headers || log "linking kernel headers failed; the eBPF data path may be unavailable"

exec prism-kernel "$@"
