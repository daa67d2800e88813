#!/usr/bin/env bash
# The offline benchmark of issue 7 (not run in CI): DMD2 and DMD v1 students of the shipped
# Fashion-MNIST teacher against the teacher at 1, 4 and 50 steps, 10,000 samples a row, the
# shipped classifier's features, Fashion-MNIST's 10K test split as reference, all rows in one
# `dmd compare` call (runs/fashion-compare). Hours on 2 CPU cores; rerunning resumes every
# step: distill from its last checkpoint, make-pairs from its last shard, compare from its last
# finished row. On a GPU machine bench/fashion_gpu.sh runs the same commands (and, with LONG=N,
# longer variants beside them).
# Usage: bash bench/fashion.sh [NUM]    env: DMD (the dmd command), BATCH (sampling batch, 32)
set -euo pipefail
cd "$(dirname "$0")/.."
DMD="${DMD:-.venv/bin/dmd}"
NUM="${1:-10000}"
BATCH="${BATCH:-32}"
export HF_HUB_OFFLINE=1

# DMD2: two time-scale rule and GAN (recipes/fashion.toml).
$DMD distill recipes/fashion.toml
# DMD v1: regression on teacher ODE pairs (DDIM 50 steps, guidance 2, the recipe's).
$DMD make-pairs --teacher unet2d --recipe recipes/fashion.toml --steps 50 --num 4096 --batch-size "$BATCH" \
    --out pairs/fashion
$DMD distill recipes/fashion.toml --set run.out=runs/fashion-dmd --set train.method=dmd \
    --set train.critic_steps_per_generator_step=1 --set regression.pairs=pairs/fashion \
    --set gan.generator_weight=0 --set gan.critic_weight=0
# --ref fashion-mnist: the shipped statistics of the 10K test split (dmd fid-ref made them).
$DMD compare runs/fashion runs/fashion-dmd --out runs/fashion-compare --ref fashion-mnist --features fashion \
    --num "$NUM" --teacher-steps 1,4,50 --batch-size "$BATCH"
