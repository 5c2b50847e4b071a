#!/usr/bin/env bash
# Upgrade under load (issue 3): wrk against baton-demo for 20 s while 10
# upgrades fire, keep-alive and Connection: close, next to a steady run
# without upgrades (the baseline, same rounds, same machine); then the
# handoff-scale benchmark (1k and 10k idle connections). The baton-demo part
# of scripts/bench/run.sh, with these settings (server on CPU 0, wrk on CPU
# 1, 5 alternating rounds: ~8 min); prints its Markdown report.
#   scripts/bench-upgrade.sh [--quick]     (--quick: 3 s, 2 upgrades, 200 conns, 1 round)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--quick" ]]; then
  exec scripts/bench/run.sh --quick --only baton-demo,load,handoff
fi
exec scripts/bench/run.sh --only baton-demo,load,handoff --duration 20 --upgrades 10
