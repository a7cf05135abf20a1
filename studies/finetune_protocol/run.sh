#!/usr/bin/env bash
# The fine-tuning protocol study (fine-tuning continues the pre-trained run's weights, EMA and Adam state):
# per data set, PRETRAIN DSM pre-training steps (default 3000), then 1000 steps of each arm, SEEDS seeds
# (default 3), with the ODE–SDE gap.
#   bash studies/finetune_protocol/run.sh runs/protocol 2                              # the pilot (gmm, 8gaussians, VP)
#   bash studies/finetune_protocol/run.sh runs/confirm 2 vp moons rings pinwheel       # held-out confirmation
#   bash studies/finetune_protocol/run.sh runs/confirm_ve 2 ve moons                   # VE on one held-out set
#   PRETRAIN=10000 SEEDS=5 bash studies/finetune_protocol/run.sh runs/full_vp 1 vp moons rings pinwheel imbalanced
# The larger grid on a cluster: STUDY_FLAGS="--slurm-partition P" SEEDS=20 PRETRAIN=20000 bash ... (the study
# sends each run to SLURM through submitit; the cluster extra).
# About 5–7 minutes per data set on 2 CPU cores at the defaults. Usage: run.sh OUT [JOBS] [SDE] [DATA ...]
set -euo pipefail
out=${1:?usage: run.sh OUT [JOBS] [SDE] [DATA ...]}
jobs=${2:-1}
sde=${3:-vp}
shift $(( $# < 3 ? $# : 3 ))
data_sets=("$@")
[ ${#data_sets[@]} -gt 0 ] || data_sets=(gmm 8gaussians)
for data in "${data_sets[@]}"; do
  python -m fpe_lab.run study toy2d --data "$data" --sde "$sde" --pretrain-steps "${PRETRAIN:-3000}" --steps 1000 \
      --seeds "${SEEDS:-3}" --jobs "$jobs" ${STUDY_FLAGS:-} \
      --arm "reg=none" \
      --arm "reg=fpe fpe_weighting=normalized lam=0.1" \
      --arm "reg=fpe fpe_weighting=g2 lam=0.0375" \
      --arm "reg=hodsm lam=0.1" \
      --arm "reg=conservative lam=0.1" \
      --eval-points 300 --eval-nll-points 300 --eval-samples 0 --eval-gap-grid 48 \
      --out "$out/$data"
done
