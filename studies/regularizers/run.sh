#!/usr/bin/env bash
# The regularizer study: DSM pre-training, then equal-step fine-tuning with each regularizer, paired over
# seeds, on 4 toy sets x {VP, VE}. Usage: bash studies/regularizers/run.sh [RUNS_DIR] [JOBS]
# Run folders go under RUNS_DIR (default runs/regularizers); each (data, SDE) writes its summary.csv/.md
# there, and `python studies/regularizers/report.py RUNS_DIR` collects them into this folder.
# Sized for ~1 hour on 2 CPU cores; the full grid for a cluster is in README.md.
set -euo pipefail
out=${1:-runs/regularizers}
jobs=${2:-2}
for data in gmm checkerboard swissroll 8gaussians; do
  for sde in vp ve; do
    python -m fpe_lab.run study toy2d --data "$data" --sde "$sde" --seeds 5 --jobs "$jobs" \
      --pretrain-steps 1000 --steps 300 --grad-clip 1 \
      --eval-points 300 --eval-nll-points 100 --eval-samples 300 \
      --arm "reg=none" \
      --arm "reg=fpe fpe_weighting=g2 lam=0.000375" \
      --arm "reg=fpe fpe_weighting=g2 lam=0.00375" \
      --arm "reg=fpe fpe_weighting=g2 lam=0.0375" \
      --arm "reg=fpe fpe_weighting=normalized lam=0.1" \
      --arm "reg=conservative lam=0.1" \
      --arm "reg=hodsm lam=0.1" \
      --out "$out/${data}_${sde}"
  done
done
