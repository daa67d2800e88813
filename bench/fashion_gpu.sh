#!/usr/bin/env bash
# Issue 7's benchmark (bench/fashion.sh's commands) on one GPU machine inside a short lease.
# These networks are far too small to fill a GPU, so the distillations run side by side:
#   fashion           DMD2, recipes/fashion.toml as it stands (5,000 steps, the EDM teacher)
#   fashion-dmd       DMD v1, bench/fashion.sh's settings (3,500 steps)
#   fashion-dmd-restart  its restart: 500 more steps from its last checkpoint
# and, with LONG=N, two more: the same runs with train.steps=N and train.batch_size=LONG_BATCH
# (fashion-long, fashion-dmd-long), and with VARIANTS="NAME:KEY=VALUE;KEY=VALUE NAME2:..." one
# DMD2 run per variant, the recipe with those --set overrides (runs/NAME), e.g.
#   VARIANTS="fashion-dm980:train.dm_timesteps=[20,980] fashion-gan1e-2:gan.generator_weight=1e-2"
# (a variant keeps the teacher and its guidance: compare measures the runs of one teacher)
# Each distillation gets CAP seconds; then it is stopped
# cleanly (SIGTERM: it finishes its step and writes a checkpoint) and measured where it got to
# (compare.json names each run's step). All runs are then measured in one `dmd compare` call
# (runs/fashion-compare), one after another, so each row's images/s are its own.
# Usage: bash bench/fashion_gpu.sh [NUM]
#   env: DMD (the dmd command), PY (its python), BATCH (500), CAP (300 s), LONG (0: off),
#        LONG_BATCH (128), VARIANTS (none), PAIRS (4096), LOGS (runs/gpu-logs)
# On a lent machine with no network (BENCHMARKS.md, issue 7): carry diffusers, clean-fid,
# tomli-w and scipy<1.18 as wheels, and put Fashion-MNIST's four Debian files in
# /usr/share/datasets/fashion-mnist. Wheels and data together exceed one call's 64 MiB, so
# bring the data in a first call and the wheels in the next, while the machine is warm.
# Four runs side by side on an H200 (2026-11-27, the older layout) made about 6 to 11 iterations/s each. Exits 1 if a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
DMD="${DMD:-.venv/bin/dmd}"
PY="${PY:-.venv/bin/python}"
NUM="${1:-10000}"
BATCH="${BATCH:-500}"
CAP="${CAP:-300}"
LONG="${LONG:-0}"
LONG_BATCH="${LONG_BATCH:-128}"
VARIANTS="${VARIANTS:-}"
PAIRS="${PAIRS:-4096}"
LOGS="${LOGS:-runs/gpu-logs}"
[[ "$LONG" =~ ^[0-9]+$ ]] || { echo "LONG must be a whole number of steps (0: off), got $LONG"; exit 2; }
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-3}"
mkdir -p "$LOGS"
t0=$SECONDS
stamp() { echo "[$((SECONDS - t0)) s] $*"; }
run() {   # run NAME CMD...: log to $LOGS/NAME.log; print its tail and return 1 if it failed
    local name=$1; shift
    "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    stamp "$name: exit $rc"
    [ $rc -eq 0 ] || [ $rc -eq 124 ] && return 0   # 124: stopped at CAP, with a checkpoint
    tail -n 15 "$LOGS/$name.log"
    return 1
}
fail=0
wait_all() { local p; for p in "$@"; do wait "$p" || fail=1; done; }
# DMD v1: the recipe with regression on the pairs (the paper's weight 0.25) in place of the GAN
# (bench/fashion.sh says why).
V1=(--set train.method=dmd --set regression.pairs=pairs/fashion --set regression.weight=0.25
    --set gan.generator_weight=0 --set gan.critic_weight=0)
capped() { timeout -s TERM -k 60 "$CAP" "$@"; }

stamp "make-pairs ($PAIRS pairs, Heun 18 steps, unguided: the EDM teacher's default)"
run make-pairs $DMD make-pairs --teacher edm --recipe recipes/fashion.toml --steps 18 --sampler heun --num "$PAIRS" \
    --batch-size "$BATCH" --out pairs/fashion || exit 1
# The DMD2 runs read Fashion-MNIST's training images: unpack them once, before they start.
run fashion-mnist $PY -c "from dmdcli.datasets import load_images; load_images('fashion-mnist')" || exit 1
RUNS=(fashion fashion-dmd fashion-dmd-restart)
[ "$LONG" -gt 0 ] && RUNS+=(fashion-long fashion-dmd-long)
for variant in $VARIANTS; do RUNS+=("${variant%%:*}"); done
stamp "${#RUNS[@]} distillations side by side, $CAP s each at most"
run fashion capped $DMD distill recipes/fashion.toml &
pids=($!)
{ run fashion-dmd capped $DMD distill recipes/fashion.toml --set run.out=runs/fashion-dmd --set train.steps=3500 "${V1[@]}" && run \
    fashion-dmd-restart capped $DMD distill recipes/fashion.toml --set run.out=runs/fashion-dmd-restart \
    --set train.init_from=runs/fashion-dmd --set train.steps=500 "${V1[@]}"; } & pids+=($!)
if [ "$LONG" -gt 0 ]; then
    run fashion-long capped $DMD distill recipes/fashion.toml --set run.out=runs/fashion-long \
        --set train.steps="$LONG" --set train.batch_size="$LONG_BATCH" & pids+=($!)
    run fashion-dmd-long capped $DMD distill recipes/fashion.toml --set run.out=runs/fashion-dmd-long \
        --set train.steps="$LONG" --set train.batch_size="$LONG_BATCH" "${V1[@]}" & pids+=($!)
fi
for variant in $VARIANTS; do
    name=${variant%%:*} sets=()
    IFS=';' read -ra kvs <<< "${variant#*:}"
    for kv in "${kvs[@]}"; do sets+=(--set "$kv"); done
    run "$name" capped $DMD distill recipes/fashion.toml --set run.out="runs/$name" "${sets[@]}" & pids+=($!)
done
wait_all "${pids[@]}"
stamp "compare: ${RUNS[*]}, the teacher at 1, 4 and 18 steps, in one call"
run compare $DMD compare "${RUNS[@]/#/runs/}" --out runs/fashion-compare --teacher-steps 1,4,18 \
    --ref fashion-mnist --features fashion --num "$NUM" --batch-size "$BATCH" || fail=1
stamp done
tail -n 30 "$LOGS/compare.log"
exit $fail
