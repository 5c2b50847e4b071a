#!/usr/bin/env bash
# Build the `baton` supervisor as one static executable (glibc linked in,
# no shared libraries): for scratch/distroless container images, and the
# smallest resident memory (only the libc code it uses is mapped: ~3 MiB
# idle instead of ~4.2 MiB with the shared libc, libm and loader).
#
#   scripts/build-static.sh        prints the executable's path on stdout
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
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --release -q -p baton-cli --target "$host" >&2
bin=$ROOT/target/$host/release/baton
file -b "$bin" 2>/dev/null | grep -q 'static' || ldd "$bin" 2>&1 | grep -q 'not a dynamic' || {
  echo "build-static.sh: $bin is not statically linked" >&2; exit 1; }
echo "$bin"
