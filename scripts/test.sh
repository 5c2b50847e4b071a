#!/usr/bin/env bash
# The test suite: installs what it needs, builds, runs every test.
#   scripts/test.sh            # everything: the doctests, then every nextest test
#   scripts/test.sh core       # only nextest tests whose name matches "core"
#
# Doctests: `cargo nextest` cannot run them, so `cargo test --doc` does, but
# only when no argument is given — the arguments are nextest's (a filter,
# `-p`, `--test`, `-E`), which `cargo test --doc` does not take. A doctest
# failure does not stop the run: nextest runs anyway, and the doctests'
# FAILED result lines are repeated at the end, so the closing line CI reads
# is nextest's summary when the doctests passed, cargo test's
# "test result: FAILED" line when they did not.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-test-deps.sh
export PATH="$PWD/.venv/bin:$PATH"
cargo build --workspace --all-targets
# The previous release's fixture for tests/wire_compat.rs, built here rather
# than inside the test's time budget (a no-op once built).
scripts/build-previous-release.sh
doc_rc=0
doc_log=$(mktemp)
trap 'rm -f "$doc_log"' EXIT
if (($# == 0)); then
  cargo test --doc --workspace --no-fail-fast 2>&1 | tee "$doc_log" || doc_rc=$?
fi
rc=0
cargo nextest run --workspace --profile ci --no-fail-fast "$@" || rc=$?
if ((doc_rc != 0)); then
  echo "doctests failed (see above):"
  grep '^test result: FAILED' "$doc_log" || echo "test result: FAILED. (cargo test --doc exited $doc_rc)"
  exit 1
fi
exit "$rc"
