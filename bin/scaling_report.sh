#!/usr/bin/env bash
# The whole pipeline on the CPU-sized default spec (specs/cpu.toml): collect scripted NetHack games, train
# bc at 6 sizes with snapshots at 5 FLOP budgets over a decade, roll out every snapshot, fit, and report
# beside the paper authors' released runs: scaling-report/{runs.csv,fit.json,reference_fit.json,report.html}.
# Rerun to resume. Extra arguments go to `trajdata sweep` (make scaling-report passes SWEEP_ARGS, default
# --parallel 2: one run per core); SPEC picks another spec (make scaling-report SPEC=specs/cpu-small.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
exec trajdata sweep "${SPEC:-specs/cpu.toml}" --out scaling-report "$@"
