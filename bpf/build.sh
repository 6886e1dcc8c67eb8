#!/usr/bin/env bash
# Build the BPF object the libbpf loader uses: bpf/prism_sock.bpf.c ->
# OUT (default bpf/prism_sock.bpf.o), an ELF object with BTF. (SRC: another
# source, for tests of upgrades and of a rejected program.)
# Needs clang and libbpf's headers (Debian: clang, libbpf-dev), nothing of the
# kernel: the programs read only uapi context fields, so the object needs no
# CO-RE relocations and serves every kernel from 5.10 on.
#   bpf/build.sh [OUT [SRC]]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${1:-$HERE/prism_sock.bpf.o}"
SRC="${2:-$HERE/prism_sock.bpf.c}"
CLANG="${CLANG:-clang}"
command -v "$CLANG" >/dev/null || { echo "bpf/build.sh: $CLANG not found (Debian: apt-get install clang libbpf-dev)" >&2; exit 1; }
[ -e /usr/include/bpf/bpf_helpers.h ] || { echo "bpf/build.sh: /usr/include/bpf/bpf_helpers.h not found (Debian: apt-get install libbpf-dev)" >&2; exit 1; }
# <linux/bpf.h> pulls <asm/types.h>, which Debian keeps in the multiarch dir;
# -target bpf does not search it by itself.
MULTIARCH="$(gcc -print-multiarch 2>/dev/null || dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)"
TMP="$OUT.tmp.$$"
trap 'rm -f "$TMP"' EXIT
"$CLANG" -target bpf -O2 -g -Wall -Werror -idirafter "/usr/include/$MULTIARCH" -c "$SRC" -o "$TMP"
mv -f "$TMP" "$OUT"
echo "bpf/build.sh: built $OUT ($(stat -c %s "$OUT") bytes)"
