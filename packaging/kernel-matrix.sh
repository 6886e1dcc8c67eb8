#!/usr/bin/env bash
# The kernel matrix (docs/kernel-matrix.md): the data-path tests inside QEMU
# guests booted on Debian's own kernels (5.10 bullseye, 6.1 bookworm, 6.12
# trixie), one guest after another; a per-kernel summary at the end.
#
#   packaging/kernel-matrix.sh                           every kernel, default selection
#   packaging/kernel-matrix.sh --kernels 5.10            one kernel
#   packaging/kernel-matrix.sh --kernels 6.12 -- -x -k nftables tests/test_datapath_nftables.py
#                                                        pytest arguments instead of the default
#                                                        (-m "guest and not timing" tests)
#   packaging/kernel-matrix.sh --help                    every option
#
# Needs root, the venv (packaging/dev.sh setup) and qemu-system-x86 + kmod:
# `packaging/dev.sh matrix [ARGS]` installs those and runs this script.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
[ -x "$REPO/.venv/bin/python" ] || { echo "kernel-matrix: no .venv: run packaging/dev.sh setup first" >&2; exit 1; }
exec "$REPO/.venv/bin/python" -m tests.matrix "$@"
