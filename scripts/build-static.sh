#!/usr/bin/env bash
# Build the `baton` supervisor as one static executable (glibc linked in,
# no shared libraries): for scratch/distroless container images, and the
# smallest resident memory (only the libc code it uses is mapped: ~3 MiB
# idle instead of ~4.2 MiB with the shared libc, libm and loader).
# A static server also starts faster: no loader, no shared libraries to map
# and relocate, which is part of every upgrade's trigger -> ready time (the
# benchmark's spawn scenario builds baton-demo both ways and shows both).
#
#   scripts/build-static.sh [BIN...]   BIN: baton (the default), baton-demo;
#                                      prints each executable's path on stdout
#
# The flag is given for the host target explicitly (--target), so build
# scripts and proc macros stay dynamic as they must.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
host=$(rustc -vV | sed -n 's/^host: //p')
case "$host" in
  *-linux-gnu) ;;
  *) echo "build-static.sh: a static glibc build needs a *-linux-gnu host, not $host" >&2; exit 1 ;;
esac
(( $# )) || set -- baton
pkgs=()
for b in "$@"; do
  case "$b" in
    baton) pkgs+=(-p baton-cli) ;;
    baton-demo) pkgs+=(-p baton-demo) ;;
    *) echo "build-static.sh: unknown executable '$b' (baton or baton-demo)" >&2; exit 2 ;;
  esac
done
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --release -q "${pkgs[@]}" --target "$host" >&2
for b in "$@"; do
  bin=${CARGO_TARGET_DIR:-$ROOT/target}/$host/release/$b
  file -b "$bin" 2>/dev/null | grep -q 'static' || ldd "$bin" 2>&1 | grep -q 'not a dynamic' || {
    echo "build-static.sh: $bin is not statically linked" >&2; exit 1; }
  echo "$bin"
done
