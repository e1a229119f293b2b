#!/usr/bin/env bash
# The shapes preset, unchanged, on seeds 0, 1, 2, each three ways: 2 threads, 1 thread, and
# --channels-last (1 thread). The rounding differs between the three, so each is another run of
# the same recipe; the recipe counts only if all nine students pass with their last checkpoint.
# 1-thread runs go two at a time (same seed, plain and channels-last); 2-thread runs alone. Then
# `shapes.py curve` scores every checkpoint of each run against the teacher: the bars hold for the last
# one, the empty share for every one from step 50 on. OUT and EXTRA (more train.py flags) override
# the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/robust}
COMMON="--preset shapes --val-every 0 --keep 100 ${EXTRA:-}"
mkdir -p "$OUT"

run() {  # run NAME THREADS SEED [FLAGS...]: one preset run, skipped when its student exists
  local name=$1 threads=$2 seed=$3
  shift 3
  [ -d "$OUT/$name-s$seed/student" ] && return 0
  OMP_NUM_THREADS=$threads python train.py $COMMON --seed "$seed" --out "$OUT/$name-s$seed" "$@" \
    > "$OUT/$name-s$seed.log" 2>&1
}

for seed in 0 1 2; do
  run t1 1 "$seed" & run cl 1 "$seed" --channels-last & wait
  run t2 2 "$seed"
done
python shapes.py curve $OUT/t2-s{0,1,2} $OUT/t1-s{0,1,2} $OUT/cl-s{0,1,2} --json $OUT/robust.json
