#!/usr/bin/env bash
# Fuzz the handoff decoder on stable Rust for SECONDS (default 60).
#   scripts/fuzz-protocol.sh [SECONDS] [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --release -q -p baton --example fuzz_decode -- "${1:-60}" ${2:-}
