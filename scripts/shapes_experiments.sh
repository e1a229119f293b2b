#!/usr/bin/env bash
# The paper's two training experiments rerun in the shapes world (README, "The paper's training experiments"):
#   Figure 2: Frechet distance over training, fixed kappa (SwiftBrush) vs random kappa (PG-SB), 3 seeds.
#   Table 2:  random kappa on neither teacher, the frozen one, the LoRA one, both.
# Each run is a shortened distillation of the shipped teacher; every checkpoint is kept and scored.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-150}
COMMON="--preset shapes --steps $STEPS --batch-size 16 --save-every 25 --keep 100 --val-every 0 --log-every 25"
for seed in 0 1 2; do
  for rk in none both; do
    [ -d runs/exp/$rk-s$seed/student ] || python train.py $COMMON --random-kappa $rk --seed $seed --out runs/exp/$rk-s$seed
  done
done
for rk in teacher lora; do
  [ -d runs/exp/$rk-s0/student ] || python train.py $COMMON --random-kappa $rk --seed 0 --out runs/exp/$rk-s0
done
python shapes.py curve runs/exp/none-s{0,1,2} runs/exp/both-s{0,1,2} --json runs/exp/figure2.json
python shapes.py curve runs/exp/{none,teacher,lora,both}-s0 --json runs/exp/table2.json
