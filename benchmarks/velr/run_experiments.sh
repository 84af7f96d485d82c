#!/bin/sh
# The README's measurements, end to end on CPU (one thread: much faster than two contended ones).
# Usage (from the repo root): sh benchmarks/velr/run_experiments.sh [MODEL] [OUT] [TRUE_REWARD]
# The README's numbers: MODEL=tiny-cogvideox (the trained asset), TRUE_REWARD=alignment, OUT=out/velr_cog.
set -e
MODEL=${1:-tiny-cogvideox}
OUT=${2:-out/velr_cog}
REWARD=${3:-alignment}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
trl-video bench velr.build-dataset --model "$MODEL" --out "$OUT/data" --world 256 --policy 192 --x0 192 \
    --pixel-reward "$REWARD" | tee "$OUT/build_dataset.log"
trl-video bench velr.pretrain --data "$OUT/data" --out "$OUT/lrm" --members 10 --epochs 30 --lr 1e-3 --batch 16 \
    --widths 16,32,64 | tee "$OUT/pretrain.log"
trl-video bench velr.eval-lrm --lrm "$OUT/lrm" --json "$OUT/eval_lrm.json" | tee "$OUT/eval_lrm.log"
trl-video bench velr.compare --lrm "$OUT/lrm" --model "$MODEL" --out "$OUT/compare" --steps 50 --batch 8 \
    --pixel-reward "$REWARD" \
    --set 'sampler_args={"num_steps": 20, "grad_steps": 4, "start_range": [6, 10]}' \
    --set 'method_args={"align_lr": 1e-4, "reward_scale": 10.0}' --set 'learning_rate=5e-3' | tee "$OUT/compare.log"
trl-video bench velr.memory --model "$MODEL" --batch 4 --num-steps 10 --grad-steps 2 --json "$OUT/memory_32.json" \
    | tee "$OUT/memory_32.log"
trl-video bench velr.memory --model "$MODEL" --batch 4 --num-steps 10 --grad-steps 2 --height 64 --width 64 \
    --json "$OUT/memory_64.json" | tee "$OUT/memory_64.log"
trl-video bench velr.memory --model "$MODEL" --batch 4 --num-steps 10 --grad-steps 2 --height 64 --width 64 --frames 17 \
    --json "$OUT/memory_64_17.json" | tee "$OUT/memory_64_17.log"
