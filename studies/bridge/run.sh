#!/usr/bin/env bash
# The bridge study: DSM vs DSM + score-FPE (exact / Hutchinson ∇·s, squared / unbiased ‖R‖²) on the
# Gaussian mixture of fpe_lab.data.mixture in D = 2 … 512, 2 seeds, paired by seed.
#
#     . .venv/bin/activate   # the python that has fpe_lab
#     nohup bash studies/bridge/run.sh runs/bridge > runs/bridge.log 2>&1 &
#     DIMS="3072" bash studies/bridge/run.sh runs/bridge           # the image dimension (GPU-sized)
#     python studies/bridge/report.py runs/bridge
#
# Sizes (chosen to fit ~40 min of one loaded CPU core from step times of benchmarks/bench_bridge.py and
# of single 100-step runs before the study; the study's own wall time is in studies/bridge/summary.md):
#   1000 steps of batch 256, lr 2e-3 (the toy2d preset), residual on the first 64 points of each batch
#   (--reg-batch 64), lam 0.2 with --per-dim (lam/D: 0.1 at D = 2, the toy2d preset's weight) and the
#   normalized weighting w = sigma^6/g^4; MLP 3 × max(128, D) (a narrower MLP cannot pass the
#   identity part −x/v of the score through its hidden layers when D > width);
#   evaluation at t = 0.02 0.1 0.5 1 on 200 points, NLL of 100 held-out points, no sample distances.
# D = 3072 (DIMS="3072"): the exact truth goes through the low-rank path (Woodbury, O(K·D) per point:
# 0.7 ms per point, benchmarks/bench_bridge.py), so the evaluation is cheap; training is not: the MLP is
# 3 × 3072 (28M weights): measured 1.9 s per DSM step and 15 s per score-FPE step (Hutchinson, residual
# on 64 points) on one loaded CPU core (`toy2d --data mixture --data-dim 3072 --width 3072 --per-dim
# --steps 4`), i.e. 4 hours per 1000-step FPE arm. It is sized for a GPU and has not been run on this CPU.
# Finished runs are skipped when the script is run again (a study resumes).
set -u
RUNS=${1:?usage: bash studies/bridge/run.sh RUNS_DIR}
export OMP_NUM_THREADS=1
COMMON=(--data mixture --fpe-residual-path generic --per-dim --fpe-weighting normalized --lam 0.2 --reg-batch 64
        --steps 1000 --eval-times 0.02 0.1 0.5 1 --eval-points 200 --eval-nll-points 100 --eval-samples 0
        --eval-batch 50 --seeds 2 --jobs 1 --threads 1)
HUTCH=(--arm "reg=fpe divergence=hutchinson fpe_estimator=squared"
       --arm "reg=fpe divergence=hutchinson fpe_estimator=unbiased")
for D in ${DIMS:-2 8 32 128 512}; do
  W=$(( D > 128 ? D : 128 ))
  ARMS=(--arm "reg=none")
  if [ "$D" -le 8 ]; then ARMS+=(--arm "reg=fpe divergence=exact"); fi
  echo "$(date -u +%FT%TZ) D=$D width=$W"
  python -m fpe_lab.run study toy2d "${COMMON[@]}" --data-dim "$D" --width "$W" "${ARMS[@]}" "${HUTCH[@]}" \
    --out "$RUNS/D$D" || { rc=$?; echo "$(date -u +%FT%TZ) D=$D FAILED (exit $rc)"; }
done
echo "$(date -u +%FT%TZ) done"
