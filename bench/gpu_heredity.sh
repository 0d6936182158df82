#!/usr/bin/env bash
# Issue 12's GPU comparison as one prepared call of a lent machine (its image has everything `geca train/sample/
# evaluate` import on CUDA): GHG `hidden` vs `none` after heredity-aware (`--heredity`) and published (`--no-heredity`)
# training, on RetinaMNIST-28 at the GeCA CPU preset's budget (3,000 steps of 32) and on a ~1 M GeCA (hidden 208,
# 4 heads, MLP 832) at 16×16 synthetic-fundus (2,000 steps of 64). The four trainings share the GPU (each is
# launch-bound); then 200 images per training and mode, sampled side by side (DDIM 50, CFG 1.5, seed 0), the
# `hidden` trace, and one `geca evaluate` per dataset (KID on domain features, class-faithfulness). The work happens
# in $WORK; $OUT gets only what the device tool brings back (at most 8 files): the two metrics JSON, failed.txt if
# anything failed, and one archive of the logs, traces and evaluation grids. About 5 min after gpu.sh's 9 at
# MINUTES=2; alone, MINUTES=5.
#     mkdir -p shared/data && cp ../shared/data/retinamnist.npz shared/data/   # here, once (shared/ travels)
#     bash bench/gpu_heredity.sh                        # on the GPU machine, from the repository root
#     DEVICE=cpu STEPS=2 PER_CLASS=2 SAMPLE_STEPS=2 OUT=/tmp/gh RETINA=../shared/data/retinamnist.npz \
#         PYTHON=.venv/bin/python bash bench/gpu_heredity.sh                      # dry run here
set -euo pipefail
OUT=${OUT:-gpu-heredity}
WORK=${WORK:-$(mktemp -d /tmp/gpu-heredity.XXXXXX)}
RETINA=${RETINA:-shared/data/retinamnist.npz}
DEVICE=${DEVICE:-cuda}
PER_CLASS=${PER_CLASS:-40}
SAMPLE_STEPS=${SAMPLE_STEPS:-50}
MINUTES=${MINUTES:-2}  # a cap per training, so that the call ends inside its limit whatever the card's speed
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
geca() { "$PY" -m geca "$@"; }
[ -f "$RETINA" ] || { echo "error: $RETINA is missing (copy ../shared/data/retinamnist.npz there)" >&2; exit 2; }
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$WORK/gpu.txt"; fi
start=$SECONDS
failed() { echo "$1" | tee -a "$OUT/failed.txt"; }
# The archive is written however the script ends, so that a cut or failed run still brings back its logs.
trap 'tar -czf "$OUT/heredity-logs.tar.gz" -C "$WORK" $(cd "$WORK" && ls -d *.txt *.log *.csv *.png 2>/dev/null)' EXIT

# name|data|image size|batch|steps|extra settings
pids=()
ARMS=("retina|$RETINA||32|${STEPS:-3000}|"
      "fundus|synthetic-fundus|16|64|${STEPS:-2000}|--set model.hidden_size=208 --set model.heads=4 --set model.mlp_hidden=832 --set model.name=GeCA-1M")
for arm in "${ARMS[@]}"; do
    IFS='|' read -r name data size batch steps extra <<<"$arm"
    for h in heredity no-heredity; do
        # shellcheck disable=SC2086  # $extra holds several flags
        geca train -c retinamnist-28-geca-cpu --data "$data" ${size:+--image-size $size} --batch-size "$batch" \
            --max-steps "$steps" --max-minutes "$MINUTES" --sample-every 0 --checkpoint-every "$steps" --"$h" \
            $extra --out "$WORK/$name-$h" --no-progress > "$WORK/train-$name-$h.log" 2>&1 &
        pids+=("$!")
    done
done
for pid in "${pids[@]}"; do wait "$pid" || failed "a training failed (see its train-*.log)"; done
echo "trained in $((SECONDS - start)) s"; tail -n 2 "$WORK"/train-*.log

for arm in "${ARMS[@]}"; do
    IFS='|' read -r name data _ <<<"$arm"
    sets=() pids=()
    for h in heredity no-heredity; do
        for g in hidden none; do
            trace=(); [ $g = hidden ] && trace=(--trace "$WORK/trace-$name-$h.csv")
            geca sample --run "$WORK/$name-$h" --out "$WORK/$name-$h-$g" --per-class "$PER_CLASS" --sampler ddim \
                --steps "$SAMPLE_STEPS" --cfg 1.5 --ghg $g --seed 0 --device "$DEVICE" --no-progress "${trace[@]}" \
                > "$WORK/sample-$name-$h-$g.log" 2>&1 &
            pids+=("$!")
            sets+=("$h-$g=$WORK/$name-$h-$g")
        done
    done
    for pid in "${pids[@]}"; do wait "$pid" || failed "a $name sample set failed (see its sample-*.log)"; done
    geca evaluate --generated "${sets[@]}" --real "$data:test" --train "$data:train" --features domain \
        --gg-features domain --protocol standard --no-lpips --device "$DEVICE" --out "$WORK/metrics-$name.json" \
        --no-progress > "$WORK/evaluate-$name.log" 2>&1 && cp "$WORK/metrics-$name.json" "$OUT/" \
        || failed "evaluating $name failed (see evaluate-$name.log)"
    tail -n 20 "$WORK/evaluate-$name.log"
done
echo "done in $((SECONDS - start)) s"
