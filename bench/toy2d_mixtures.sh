#!/usr/bin/env bash
# The toy2d recipe beyond the ring it was tuned on (issue 25): for each mixture, the exact
# teacher's ODE pairs (50 Heun steps, its default), then bench/toy2d_shape.py on the recipe as shipped, with the
# mixture's settings, printing the mode metrics of 10,000 one-step samples. One thread a run.
# Usage: bash bench/toy2d_mixtures.sh [NAME ...]   (default: every mixture below; from the
# repository root after `make test` set up .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# tests/test_gmm.py's mixtures: the ring the recipe was tuned on, unequal weights, tight modes
# far apart, 8 dimensions.
declare -A MIX=(
    [ring]=""
    [unequal]="teacher.gmm.weights=[4,1,1,2,1,1,3,1]"
    [tight]="teacher.gmm.components=5 teacher.gmm.radius=6.0 teacher.gmm.std=0.2"
    [8d]="teacher.gmm.components=6 teacher.gmm.radius=4.0 teacher.gmm.std=0.5 teacher.gmm.dim=8"
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(ring unequal tight 8d)
for name in "${names[@]}"; do
    sets=() ; over=()
    for kv in ${MIX[$name]}; do sets+=(--set "$kv"); over+=("$kv"); done
    .venv/bin/dmd make-pairs --teacher gmm --recipe recipes/toy2d.toml "${sets[@]}" --num 32768 --steps 50 \
        --batch-size 4096 --shard-size 8192 --out "pairs/toy2d-$name" >/dev/null
    .venv/bin/python bench/toy2d_shape.py "mix-$name" "${over[@]}" "regression.pairs=pairs/toy2d-$name"
done
