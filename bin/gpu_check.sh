#!/usr/bin/env bash
# The device check of issue #12, as one prepared script for a lent GPU machine (run from the repo root):
#   run: bash bin/gpu_check.sh     (timeout_s ~420; writes $OUT/train_gpu.json and $OUT/gpu_check.log)
# Installs into .venv if needed (CUDA torch from PyPI), collects ~400k scripted NetHack steps on the CPUs,
# then measures the paper preset at (576, 6) (33.3M effective), T = 4096, bf16, with the real loader:
# samples/s, MFU (6N and total FLOPs), peak GPU memory, data-wait fraction; and which grid sizes fit.
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && .venv/bin/pip install -q -e ".[all]"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
timeout 400 .venv/bin/python bin/bench_train.py --device cuda --steps 20 --nethack-steps 400000 \
  --workers "$(nproc)" --out "$OUT/train_gpu.json" 2>&1 | tee "$OUT/gpu_check.log"
