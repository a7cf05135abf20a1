#!/usr/bin/env bash
# Pilot of the fine-tuning protocol (fine-tuning continues the pre-trained run's weights, EMA and Adam state):
# does a converged DSM model stay as good when the control arm trains 1000 further DSM steps, and where do the
# regularizers move the NLL gap and the ODE–SDE gap? Two of the exploration data sets, VP, 3 seeds.
# About 40 minutes on 2 CPU cores. Usage: bash studies/finetune_protocol/run.sh OUT [JOBS]
set -euo pipefail
out=${1:?usage: run.sh OUT [JOBS]}
jobs=${2:-1}
for data in gmm 8gaussians; do
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
