#!/usr/bin/env bash
# The toy2d benchmark: recipes/toy2d.toml as shipped (its pairs, then DMD2), 10,000 one-step samples, metrics
# against the exact mixture, beside the teacher's 50-step ODE from the same noise (Heun; Euler
# under the flow schedule).
# Usage: bench/toy2d.sh [SEED] [vp|flow]   (from the repository root after `make test` set up .venv)
set -euo pipefail
seed=${1:-0}
schedule=${2:-vp}
out=runs/bench-toy2d-$schedule-seed$seed
rm -rf "$out"
bin=.venv/bin
start=$(date +%s.%N)
# The recipe's regression pairs: the teacher's 50-step ODE (Heun; Euler under flow).
$bin/dmd make-pairs --teacher gmm --recipe recipes/toy2d.toml --set teacher.gmm.schedule="$schedule" \
    --num 32768 --steps 50 --batch-size 4096 --shard-size 8192 --out "$out/pairs"
$bin/dmd distill recipes/toy2d.toml --set run.out="$out" --set run.seed="$seed" --set teacher.gmm.schedule="$schedule" \
    --set regression.pairs="$out/pairs"
mid=$(date +%s.%N)
$bin/dmd sample "$out" --num 10000 --out "$out/samples" --teacher-steps 50
$bin/dmd fid "$out/samples" --ref gmm --json "$out/student.json"
$bin/dmd fid "$out/samples/teacher.safetensors" --ref gmm --json "$out/teacher.json"
$bin/python - "$out" "$start" "$mid" <<'PY'
import json, sys
out, start, mid = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
for who in ("student", "teacher"):
    r = json.load(open(f"{out}/{who}.json"))
    m, s = r["mode_mass_ratio"], r["mode_spread_ratio"]
    print(f"{who}: precision {r['precision']:.3f}, mode mass {min(m):.2f}..{max(m):.2f}, "
          f"spread {min(s):.2f}..{max(s):.2f}, between modes {r['far_share']:.1%}, "
          f"worst-mode energy {r['mode_energy']:.2f}, Frechet (GMM coords) {r['frechet_distance']:.4f}, "
          f"n={r['num_samples']}")
print(f"distill wall time: {mid - start:.0f} s")
PY
