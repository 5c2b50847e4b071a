#!/usr/bin/env bash
# The safety soak (issue 6): 25 kill -9 runs per handoff phase instead of 5,
# and 1000 upgrades in a row instead of 100, in library mode and in
# `baton run`. One test at a time (they each put load on the machine).
# Takes about an hour on 2 cores; not part of CI.
#
#   scripts/soak.sh [library|supervisor]     default: both
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-test-deps.sh
export PATH=$PWD/.venv/bin:$PATH BATON_SOAK=1
which=${1:-both}
case "$which" in
  library|supervisor|both) ;;
  *) echo "soak.sh: library, supervisor or nothing (both), not '$which'" >&2; exit 2 ;;
esac
if [[ $which != supervisor ]]; then
  cargo test -p baton-tests --test safety -- --test-threads 1 --nocapture
fi
if [[ $which != library ]]; then
  cargo test -p baton-tests --test supervisor_safety -- --test-threads 1 --nocapture
fi
echo "soak: passed"
