#!/usr/bin/env bash
# The GPU checks of issue 15 as one prepared call of a lent machine (its image has torch, triton, numpy, pyyaml,
# pillow and pytest; nothing else of ours is needed): the Triton kernels against the other implementations on CUDA,
# then a training step per config and attention implementation (img/s, peak memory, MFU). Files land in $OUT.
#     bash bench/gpu.sh                      # on the GPU machine, from the repository root
#     DEVICE=cpu CONFIGS=GeCA-T BATCH=2 RESOLUTION=8 PRECISIONS=fp32 OUT=/tmp/g bash bench/gpu.sh   # dry run here
set -euo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
if [ "${DEVICE:-cuda}" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"; fi
"$PY" -m pytest -q -p no:cacheprovider tests/test_attention.py 2>&1 | tee "$OUT/attention-tests.txt"
"$PY" bench/train_step.py --device "${DEVICE:-cuda}" --configs "${CONFIGS:-GeCA-S,DiT-S/2,LDM-B}" \
    --batch "${BATCH:-32}" --resolution "${RESOLUTION:-32}" --channels 4 --classes 11 \
    --precisions "${PRECISIONS:-bf16}" --json > "$OUT/train_step.json"
"$PY" -c "import json, sys; [print(r) for r in json.load(open(sys.argv[1]))['rows']]" "$OUT/train_step.json"
