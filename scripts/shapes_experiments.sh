#!/usr/bin/env bash
# The paper's two training experiments rerun in the shapes world (README, "The paper's training experiments"):
#   Figure 2: Frechet distance over training, fixed kappa (SwiftBrush) vs random kappa (PG-SB), 3 seeds.
#   Table 2:  random kappa on neither teacher, the frozen one, the LoRA one, both.
# Each run is a shortened distillation (150 steps); every checkpoint is kept and scored.
# The README's tables were made from the teacher shipped before the cosine-schedule teacher (commit
# cadb006, taken from git history into runs/teacher_cadb006 unless TEACHER names another) with that
# time's student settings: student lr 3e-5, EMA 0.99, and the preset's LoRA teacher (q, v and the
# ResNet convolutions, three updates per student step) unless LORA says otherwise; the README's
# second pair of tables comes from the paper's attention-only LoRA teacher:
#   LORA="--lora-targets to_q,to_v --lora-updates 1 --ema 0" OUT=runs/exp_qv bash scripts/shapes_experiments.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-150}
OUT=${OUT:-runs/exp}
TEACHER=${TEACHER:-runs/teacher_cadb006}
if [ ! -d "$TEACHER" ]; then
  mkdir -p "$TEACHER"
  git archive cadb006 checkpoints/shapes_teacher | tar -x -C "$TEACHER" --strip-components 2
fi
COMMON="--preset shapes --teacher $TEACHER --steps $STEPS --batch-size 16 --lr-student 3e-5 --ema 0.99
        --save-every 25 --keep 100 --val-every 0 --log-every 25 ${LORA:-}"
for seed in 0 1 2; do
  for rk in none both; do
    [ -d $OUT/$rk-s$seed/student ] || python train.py $COMMON --random-kappa $rk --seed $seed --out $OUT/$rk-s$seed
  done
done
for rk in teacher lora; do
  [ -d $OUT/$rk-s0/student ] || python train.py $COMMON --random-kappa $rk --seed 0 --out $OUT/$rk-s0
done
python shapes.py curve $OUT/none-s{0,1,2} $OUT/both-s{0,1,2} --teacher $TEACHER --json $OUT/figure2.json
python shapes.py curve $OUT/{none,teacher,lora,both}-s0 --teacher $TEACHER --json $OUT/table2.json
