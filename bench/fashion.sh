#!/usr/bin/env bash
# The offline Fashion-MNIST benchmark (not run in CI): DMD2 and DMD v1 students of the shipped
# EDM teacher (teacher.edm.model = "fashion-mnist") against the teacher at 1, 4 and 18 Heun
# steps (18: its default, EDM's for 32x32), NUM samples a row (10,000 by default), the shipped
# classifier's features, Fashion-MNIST's 10K test split as reference, all rows in one
# `dmd compare` call (runs/fashion-compare). Hours on 2 CPU cores; rerunning resumes every
# step: distill from its last checkpoint, make-pairs from its last shard, compare from its last
# finished row. On a GPU machine bench/fashion_gpu.sh runs the same commands.
# Usage: bash bench/fashion.sh [NUM] [dmd2|v1|all]    env: DMD (the dmd command), BATCH (sampling batch, 50)
set -euo pipefail
cd "$(dirname "$0")/.."
DMD="${DMD:-.venv/bin/dmd}"
NUM="${1:-10000}"
HALF="${2:-all}"
BATCH="${BATCH:-50}"
export HF_HUB_OFFLINE=1
t0=$SECONDS
stamp() { echo "[$((SECONDS - t0)) s] $*"; }

RUNS=()
if [ "$HALF" != v1 ]; then
    # DMD2: two time-scale rule and GAN on real images, 5,000 iterations (recipes/fashion.toml).
    $DMD distill recipes/fashion.toml
    stamp "DMD2 distilled"
    RUNS+=(runs/fashion)
fi
if [ "$HALF" != dmd2 ]; then
    # DMD v1: DM loss plus regression on teacher ODE pairs (Heun 18 steps, unguided, as the recipe's
    # teacher) at the paper's weight 0.25, in place of DMD2's GAN; the recipe's two time-scale rule
    # (5 critic steps a generator step) and rates for 3,500 iterations, then a restart: a new run from
    # the last checkpoint, 500 iterations (at one critic step a generator step and 3e-4 every class
    # collapsed to one image; BENCHMARKS.md).
    $DMD make-pairs --teacher edm --recipe recipes/fashion.toml --steps 18 --sampler heun --num 4096 \
        --batch-size "$BATCH" --shard-size 512 --out pairs/fashion
    stamp "pairs made"
    V1=(--set train.method=dmd --set regression.pairs=pairs/fashion --set regression.weight=0.25
        --set gan.generator_weight=0 --set gan.critic_weight=0)
    $DMD distill recipes/fashion.toml --set run.out=runs/fashion-dmd --set train.steps=3500 "${V1[@]}"
    $DMD distill recipes/fashion.toml --set run.out=runs/fashion-dmd-restart --set train.init_from=runs/fashion-dmd \
        --set train.steps=500 "${V1[@]}"
    stamp "DMD v1 distilled"
    RUNS+=(runs/fashion-dmd-restart)
fi
# --ref fashion-mnist: the shipped statistics of the 10K test split (dmd fid-ref made them).
$DMD compare "${RUNS[@]}" --out runs/fashion-compare --ref fashion-mnist --features fashion \
    --num "$NUM" --teacher-steps 1,4,18 --batch-size "$BATCH"
stamp "compared"
