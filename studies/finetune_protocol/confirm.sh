#!/usr/bin/env bash
# First held-out confirmation of studies/finetune_protocol/claims.md (written before this ran): the pilot's
# exact protocol and arms on three data sets it never saw (moons, rings, pinwheel), VP, 3 seeds.
# About 40 minutes on 2 CPU cores. Usage: bash studies/finetune_protocol/confirm.sh OUT [JOBS]
set -euo pipefail
out=${1:?usage: confirm.sh OUT [JOBS]}
jobs=${2:-1}
for data in moons rings pinwheel; do
  python -m fpe_lab.run study toy2d --data "$data" --sde vp --pretrain-steps 3000 --steps 1000 --seeds 3 \
      --jobs "$jobs" \
      --arm "reg=none" \
      --arm "reg=fpe fpe_weighting=normalized lam=0.1" \
      --arm "reg=fpe fpe_weighting=g2 lam=0.0375" \
      --arm "reg=hodsm lam=0.1" \
      --arm "reg=conservative lam=0.1" \
      --eval-points 300 --eval-nll-points 300 --eval-samples 0 --eval-gap-grid 48 \
      --out "$out/$data"
done
