#!/usr/bin/env bash
# Scaling-law report on the paper authors' NetHack runs: scaling-report/{fit.json,report.html}.
# Extra arguments go to `trajdata scaling fit` (e.g. --bootstrap 200, --min-budget 2e15).
set -euo pipefail
cd "$(dirname "$0")/.."
exec trajdata scaling fit tests/data/il-scaling/nethack_llama_isoflop.csv --out scaling-report/ "$@"
