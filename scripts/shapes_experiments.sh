#!/usr/bin/env bash
# The paper's two training experiments rerun in the shapes world (README, "The paper's training experiments"):
#   Figure 2: Frechet distance over training, fixed kappa (SwiftBrush) vs random kappa (PG-SB), 3 seeds.
#   Table 2:  random kappa on neither teacher, the frozen one, the LoRA one, both, 3 seeds.
# Each run is PRESET (default shapes_pgsb: the paper's PG-SB, which the README's tables ran) at STEPS
# steps, a checkpoint kept every 25 steps; `shapes.py curve` then scores every checkpoint in one step
# at n=256. Runs go two at a time, one thread each: on 2 cores that is ~20% faster than one after the
# other at two threads (the thread count changes the rounding, so a run is reproduced bit for bit only
# at the same count).
# Six pairs of 1-thread runs (about 33 min a pair at 300 steps on 2 cores). STEPS, OUT, TEACHER,
# PRESET and EXTRA (more train.py flags) override the defaults; TABLE2=0 runs Figure 2 alone.
# With PRESET=shapes (the shipped recipe, whose LoRA teacher is unguided) Table 2's settings fold into
# Figure 2's two arms (lora = none, teacher = both): run it with TABLE2=0.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-300}
OUT=${OUT:-runs/exp}
TEACHER=${TEACHER:-checkpoints/shapes_teacher}
PRESET=${PRESET:-shapes_pgsb}
COMMON="--preset $PRESET --teacher $TEACHER --steps $STEPS --save-every 25 --keep 100 --val-every 0 ${EXTRA:-}"
mkdir -p "$OUT"

pair() {  # pair SEED KAPPA_A KAPPA_B: the two runs side by side
  local pids=() rk
  for rk in "$2" "$3"; do
    if [ ! -d "$OUT/$rk-s$1/student" ]; then
      OMP_NUM_THREADS=1 python train.py $COMMON --random-kappa "$rk" --seed "$1" --out "$OUT/$rk-s$1" \
        > "$OUT/$rk-s$1.log" 2>&1 &
      pids+=($!)
    fi
  done
  for p in "${pids[@]}"; do wait "$p"; done
}

TABLE2=${TABLE2:-1}
for seed in 0 1 2; do
  pair $seed none both
  if [ "$TABLE2" != 0 ]; then pair $seed teacher lora; fi
done
# Table 2's "neither" and "both" columns are the runs of Figure 2.
python shapes.py curve $OUT/none-s{0,1,2} $OUT/both-s{0,1,2} --teacher $TEACHER --json $OUT/figure2.json
if [ "$TABLE2" != 0 ]; then
  python shapes.py curve $OUT/{teacher,lora}-s{0,1,2} --teacher $TEACHER --json $OUT/table2.json
fi
