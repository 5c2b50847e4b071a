#!/usr/bin/env bash
# The test suite: installs what it needs, builds, runs every test.
#   scripts/test.sh            # everything
#   scripts/test.sh core       # only tests whose name matches "core"
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-test-deps.sh
export PATH="$PWD/.venv/bin:$PATH"
cargo build --workspace --all-targets
exec cargo nextest run --workspace --profile ci --no-fail-fast "$@"
