#!/usr/bin/env bash
# The GPU checks of issue 15 as one prepared call of a lent machine (its image has torch, triton, numpy, pyyaml,
# pillow and pytest; nothing else of ours is needed): the Triton kernels against the other implementations on CUDA,
# then a training step per config and attention implementation (img/s, peak memory, MFU; `compiled:dense` is the whole
# NCA step under torch.compile), and sampling in fp32 and bf16. Files land in $OUT.
#     bash bench/gpu.sh                      # on the GPU machine, from the repository root
#     DEVICE=cpu CONFIGS=GeCA-T BATCH=2 RESOLUTION=8 BATCH_1M=2 RESOLUTION_1M=4 PRECISIONS=fp32 REPEATS=2 \
#         SAMPLE_SETTINGS=ddim:2 SAMPLE_PRECISIONS=fp32 OUT=/tmp/g \
#         bash bench/gpu.sh                  # dry run here
set -euo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
if [ "${DEVICE:-cuda}" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"; fi
# A failing command is recorded and the next one still runs: each measures something of its own.
"$PY" -m pytest -q -p no:cacheprovider tests/test_attention.py 2>&1 | tee "$OUT/attention-tests.txt" \
    || echo "attention tests failed" | tee -a "$OUT/failed.txt"
# Each table is written row by row as it is measured (its JSON is the last line), so a run cut short keeps its rows.
# The launch-bound 1 M GeCA first (the 1.03 M: 16×16×1, batch 64; goal ≥ 3× today's 986 img/s), then the
# published sizes. `fast+graphs:dense` is the 1 M model under CUDA graphs (torch.compile reduce-overhead). LDM-B is
# left out: its UNet is diffusers', which the lent image lacks (carry its wheel and add CONFIGS=...,LDM-B to time it).
"$PY" bench/train_step.py --device "${DEVICE:-cuda}" --configs GeCA-T --set hidden_size=208 --set heads=4 \
    --set mlp_hidden=832 --batch "${BATCH_1M:-64}" --resolution "${RESOLUTION_1M:-16}" --channels 1 --classes 2 \
    --precisions "${PRECISIONS:-bf16}" \
    --attention "${ATTENTION_1M:-compiled:dense,compiled,fast,fast:dense,fast+graphs:dense}" \
    --repeats "${REPEATS:-20}" 2>&1 | tee "$OUT/train_step_1m.txt" || echo "1 M table failed" | tee -a "$OUT/failed.txt"
"$PY" bench/train_step.py --device "${DEVICE:-cuda}" --configs "${CONFIGS:-GeCA-S,DiT-S/2}" \
    --batch "${BATCH:-32}" --resolution "${RESOLUTION:-32}" --channels 4 --classes 11 \
    --precisions "${PRECISIONS:-bf16}" --repeats "${REPEATS:-20}" 2>&1 | tee "$OUT/train_step.txt" \
    || echo "published-size table failed" | tee -a "$OUT/failed.txt"
# Sampling in fp32 and bf16 (`geca sample --precision`): seconds per image, peak memory, MFU, bf16's speed-up.
# DDIM: a call costs what it costs under any sampler, and DPM-Solver++ needs diffusers, which that image lacks.
"$PY" bench/sample.py --device "${DEVICE:-cuda}" --configs "${CONFIGS:-GeCA-S,DiT-S/2}" \
    --batch "${BATCH:-32}" --resolution "${RESOLUTION:-32}" --channels 4 --classes 11 \
    --settings "${SAMPLE_SETTINGS:-ddim:25}" --precisions "${SAMPLE_PRECISIONS:-fp32,bf16}" 2>&1 \
    | tee "$OUT/sample.txt" || echo "sampling table failed" | tee -a "$OUT/failed.txt"
