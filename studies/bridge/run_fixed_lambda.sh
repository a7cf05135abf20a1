#!/usr/bin/env bash
# Follow-up of the bridge study (run after run.sh, same RUNS_DIR): the squared-Hutchinson arm with a
# fixed weight lam = 0.1 instead of lam/D (--per-dim off), at D = 32, 128, 512, seeds 0 and 1 — the
# same objective as the main study's D = 2 arm (0.2/2 = 0.1). The main study showed the weighted
# regularizer's share of the loss falling like 1/D under --per-dim (both DSM and ‖R‖² grow like D);
# this checks whether a fixed weight keeps its effect. Paired with the main study's DSM runs of the same
# seeds by studies/bridge/report.py (one arm per folder, no control of its own).
#
#     . .venv/bin/activate && nohup bash studies/bridge/run_fixed_lambda.sh runs/bridge >> runs/bridge.log 2>&1 &
set -u
RUNS=${1:?usage: bash studies/bridge/run_fixed_lambda.sh RUNS_DIR}
export OMP_NUM_THREADS=1
COMMON=(--data mixture --fpe-residual-path generic --per-dim --fpe-weighting normalized --lam 0.2 --reg-batch 64
        --steps 1000 --eval-times 0.02 0.1 0.5 1 --eval-points 200 --eval-nll-points 100 --eval-samples 0
        --eval-batch 50 --seeds 2 --jobs 1 --threads 1)
for D in 32 128 512; do
  W=$(( D > 128 ? D : 128 ))
  echo "$(date -u +%FT%TZ) fixed lam D=$D width=$W"
  python -m fpe_lab.run study toy2d "${COMMON[@]}" --data-dim "$D" --width "$W" \
    --arm "reg=fpe divergence=hutchinson fpe_estimator=squared per_dim=false lam=0.1" \
    --out "$RUNS/fixedlam_D$D" || { rc=$?; echo "$(date -u +%FT%TZ) fixed lam D=$D FAILED (exit $rc)"; }
done
echo "$(date -u +%FT%TZ) fixed lam done"
