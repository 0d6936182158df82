#!/usr/bin/env bash
# Issue 12's GPU comparison as one prepared call of a lent machine (its image has everything `geca train/sample/
# evaluate` import on CUDA): GHG `hidden` vs `none` after heredity-aware (`--heredity`) and published (`--no-heredity`)
# training, on RetinaMNIST-28 at the GeCA CPU preset's budget (3,000 steps of 32) and on a ~1 M GeCA (hidden 208,
# 4 heads, MLP 832) at 16×16 synthetic-fundus (2,000 steps of 64). The four trainings share the GPU (each is
# launch-bound); then 200 images per training and mode, sampled side by side (DDIM 50, CFG 1.5, seed 0), the
# `hidden` trace, and one `geca evaluate` per dataset (KID on domain features, class-faithfulness). Files land in $OUT.
#     mkdir -p shared/data && cp ../shared/data/retinamnist.npz shared/data/   # here, once (shared/ travels)
#     bash bench/gpu_heredity.sh                        # on the GPU machine, from the repository root
#     DEVICE=cpu STEPS=2 PER_CLASS=2 SAMPLE_STEPS=2 OUT=/tmp/gh RETINA=../shared/data/retinamnist.npz \
#         PYTHON=.venv/bin/python bash bench/gpu_heredity.sh                      # dry run here
set -euo pipefail
OUT=${OUT:-gpu-heredity}
RETINA=${RETINA:-shared/data/retinamnist.npz}
DEVICE=${DEVICE:-cuda}
PER_CLASS=${PER_CLASS:-40}
SAMPLE_STEPS=${SAMPLE_STEPS:-50}
MINUTES=${MINUTES:-5}  # a cap per training, so that the call ends inside its limit whatever the card's speed
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
geca() { "$PY" -m geca "$@"; }
[ -f "$RETINA" ] || { echo "error: $RETINA is missing (copy ../shared/data/retinamnist.npz there)" >&2; exit 2; }
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"; fi
start=$SECONDS

# name|data|image size|batch|steps|extra settings
ARMS=("retina|$RETINA||32|${STEPS:-3000}|"
      "fundus|synthetic-fundus|16|64|${STEPS:-2000}|--set model.hidden_size=208 --set model.heads=4 --set model.mlp_hidden=832 --set model.name=GeCA-1M")
for arm in "${ARMS[@]}"; do
    IFS='|' read -r name data size batch steps extra <<<"$arm"
    for h in heredity no-heredity; do
        # shellcheck disable=SC2086  # $extra holds several flags
        geca train -c retinamnist-28-geca-cpu --data "$data" ${size:+--image-size $size} --batch-size "$batch" \
            --max-steps "$steps" --max-minutes "$MINUTES" --sample-every 0 --checkpoint-every "$steps" --"$h" \
            $extra --out "$OUT/$name-$h" --no-progress > "$OUT/train-$name-$h.log" 2>&1 &
    done
done
wait
echo "trained in $((SECONDS - start)) s"; tail -n 2 "$OUT"/train-*.log

for arm in "${ARMS[@]}"; do
    IFS='|' read -r name data _ <<<"$arm"
    sets=()
    for h in heredity no-heredity; do
        for g in hidden none; do
            trace=(); [ $g = hidden ] && trace=(--trace "$OUT/trace-$name-$h.csv")
            geca sample --run "$OUT/$name-$h" --out "$OUT/$name-$h-$g" --per-class "$PER_CLASS" --sampler ddim \
                --steps "$SAMPLE_STEPS" --cfg 1.5 --ghg $g --seed 0 --device "$DEVICE" --no-progress "${trace[@]}" \
                > "$OUT/sample-$name-$h-$g.log" 2>&1 &
            sets+=("$h-$g=$OUT/$name-$h-$g")
        done
    done
    wait
    geca evaluate --generated "${sets[@]}" --real "$data:test" --train "$data:train" --features domain \
        --gg-features domain --protocol standard --no-lpips --device "$DEVICE" --out "$OUT/metrics-$name.json" \
        --no-progress 2>&1 | tee "$OUT/evaluate-$name.log"
done
echo "done in $((SECONDS - start)) s"
