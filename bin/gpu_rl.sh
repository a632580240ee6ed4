#!/usr/bin/env bash
# The device check of issue #28, as one prepared script for a lent GPU machine (run from the repo root):
#   run: bash bin/gpu_rl.sh     (timeout_s ~540; writes $OUT/rl_gpu_*.json and $OUT/gpu_rl.log)
# `train rl` with the learner on the GPU and 15 actor processes on the CPUs (one core left to the learner):
# learner samples/s at N = 100k and 10M beside the bare env's steps/s, through bin/bench_rl.py.
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && .venv/bin/pip install -q -e ".[all]"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
CORES=$(( $(nproc) - 1 ))
for P in 100k 10M; do
  timeout 240 .venv/bin/python bin/bench_rl.py --device cuda --cores "$CORES" --params "$P" --envs 32 --unroll 32 \
    --seconds 30 --out "$OUT/rl_gpu_$P.json" 2>&1 | tee -a "$OUT/gpu_rl.log"
done
