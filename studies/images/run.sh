#!/usr/bin/env bash
# The image-scale study: tiny U-Net on the 8×8 digits (real data, bits/dim) and on digits-gmm (the mixture
# fitted to them: exact NLL gap, score error and residual), with the 2-D study's fine-tuning protocol.
# Per data set and seed: PRETRAIN plain-DSM steps (default 4000), then STEPS steps of each arm (default 200)
# continuing the pre-trained weights, EMA and Adam state; the control is STEPS further DSM steps.
# Arms: DSM; FPE normalized (λ 0.1, per-dim: 0.1/D); FPE g² at the paper's α/D² (α 0.15: λ 0.15/64 with
# per-dim); high-order DSM (λ 0.1, per-dim). Every regularizer on the first 16 points of each batch, one
# Rademacher probe. SEEDS paired seeds (default 3; a finished study grows to more seeds in place).
#   SEEDS=5 bash studies/images/run.sh runs/images 1      # the committed study (seeds 0-2 first, then 3-4)
#   python studies/images/report.py runs/images --write studies/images
# About 10-15 minutes per data set and seed on one loaded CPU core (an FPE step costs ~12 DSM steps).
# Usage: run.sh OUT [JOBS] [DATA ...]
set -euo pipefail
out=${1:?usage: run.sh OUT [JOBS] [DATA ...]}
jobs=${2:-1}
shift $(( $# < 2 ? $# : 2 ))
data_sets=("$@")
[ ${#data_sets[@]} -gt 0 ] || data_sets=(digits-gmm digits)
for data in "${data_sets[@]}"; do
  python -m fpe_lab.run study digits --data "$data" --model tiny --pretrain-steps "${PRETRAIN:-4000}" \
      --steps "${STEPS:-200}" --seeds "${SEEDS:-3}" --jobs "$jobs" --reg-batch 16 \
      --arm "reg=none" \
      --arm "reg=fpe fpe_weighting=normalized lam=0.1" \
      --arm "reg=fpe fpe_weighting=g2 lam=0.00234375" \
      --arm "reg=hodsm lam=0.1" \
      --eval-nll-points 32 \
      --out "$out/$data"
done
