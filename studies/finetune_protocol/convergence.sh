#!/usr/bin/env bash
# The written convergence check of the pre-training length K: per data set, K DSM steps (the study's
# pre-trained row), then K more DSM steps continuing weights, EMA and Adam state (the "reg=none" row:
# the model at 2K). K is converged when the paired Δ (2K − K) of the PF-ODE NLL gap has a 95% interval
# containing 0. SEEDS seeds (default 3).
#   K=10000 bash studies/finetune_protocol/convergence.sh runs/convergence_vp 1 vp moons rings pinwheel imbalanced
# Usage: convergence.sh OUT [JOBS] [SDE] [DATA ...]; about 5 minutes per data set on one core at K = 10000.
set -euo pipefail
out=${1:?usage: convergence.sh OUT [JOBS] [SDE] [DATA ...]}
jobs=${2:-1}
sde=${3:-vp}
shift $(( $# < 3 ? $# : 3 ))
k=${K:-10000}
for data in "$@"; do
  python -m fpe_lab.run study toy2d --data "$data" --sde "$sde" --pretrain-steps "$k" --steps "$k" \
      --seeds "${SEEDS:-3}" --jobs "$jobs" --arm "reg=none" \
      --eval-points 300 --eval-nll-points 300 --eval-samples 0 \
      --out "$out/$data"
done
