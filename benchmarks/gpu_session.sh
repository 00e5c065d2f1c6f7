#!/usr/bin/env bash
# One lent-GPU session, all GPU measurements in one call (see docs/performance.md, docs/benchmarks.md):
#   1. COVID-SemiSeg 5-fold CV of the 2D ablation + final model      -> $OUT/semiseg/
#   2. training throughput: full model (eager, CUDA graphs) vs MONAI DynUNet, 8x128x128 x5 -> $OUT/gpu_train/
#   3. the infection stage of segment on a whole 512x512x300 CT        -> $OUT/gpu_inference/
# Usage: OUT=... SEMISEG=path/to/covid-semiseg/train bash benchmarks/gpu_session.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
timeout 250 python3 benchmarks/semiseg_cv.py --data "$SEMISEG" --out "$OUT/semiseg" --device cuda \
    --budget-s "${SEMISEG_BUDGET:-140}" --deadline-s "${SEMISEG_DEADLINE:-180}" --no-progress 2>&1 | tail -40
timeout 240 python3 benchmarks/gpu_train.py --out "$OUT/gpu_train" --device cuda --steps 40 \
    --compile none reduce-overhead 2>&1 | tail -25
timeout 90 python3 benchmarks/gpu_inference.py --out "$OUT/gpu_inference" --device cuda 2>&1 | tail -12
ls -R "$OUT"
