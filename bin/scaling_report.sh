#!/usr/bin/env bash
# The whole pipeline on the CPU-sized default spec: collect scripted NetHack games, train bc at 5 sizes
# with snapshots at 3 FLOP budgets, roll out every snapshot, fit, and report beside the paper authors'
# released runs: scaling-report/{runs.csv,fit.json,reference_fit.json,report.html}. Rerun to resume.
# Extra arguments go to `trajdata sweep` (e.g. --parallel 2, --skip-eval); SPEC picks another spec
# (make scaling-report SPEC=specs/cpu-proposed.toml SWEEP_ARGS="--parallel 2").
set -euo pipefail
cd "$(dirname "$0")/.."
exec trajdata sweep "${SPEC:-specs/cpu.toml}" --out scaling-report "$@"
