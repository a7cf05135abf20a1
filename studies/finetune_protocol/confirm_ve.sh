#!/usr/bin/env bash
# The held-out confirmation's protocol under VE on one held-out set (moons), 3 seeds: whether the VP verdicts
# carry over to VE (the gap window is [eps, t0 ≈ 0.54], started from the exact marginal; the box is wider,
# so the grid floor is higher: TV 0.16 for the exact score at 48², tests/metrics/test_gap.py).
# About 15 minutes on 2 CPU cores. Usage: bash studies/finetune_protocol/confirm_ve.sh OUT [JOBS]
set -euo pipefail
out=${1:?usage: confirm_ve.sh OUT [JOBS]}
jobs=${2:-1}
python -m fpe_lab.run study toy2d --data moons --sde ve --pretrain-steps 3000 --steps 1000 --seeds 3 \
    --jobs "$jobs" \
    --arm "reg=none" \
    --arm "reg=fpe fpe_weighting=normalized lam=0.1" \
    --arm "reg=fpe fpe_weighting=g2 lam=0.0375" \
    --arm "reg=hodsm lam=0.1" \
    --arm "reg=conservative lam=0.1" \
    --eval-points 300 --eval-nll-points 300 --eval-samples 0 --eval-gap-grid 48 \
    --out "$out/moons"
