#!/usr/bin/env bash
# The GPU checks of fpe_lab in one run (at most 580 s of step time limits: fits 10 minutes):
#
#     benchmarks/gpu_check.sh OUT_DIR
#
# Prints the date and nvidia-smi, then runs each step below with its own time limit, its output shown
# and teed to OUT_DIR/<step>.log. A failing step does not stop the others. OUT_DIR/summary.tsv lists
# step, exit code (124: hit its time limit), seconds and log file; the script exits 1 if any step
# failed, 2 on bad usage. The Python is `python` on PATH (or $PYTHON).
set -u

if [ "$#" -ne 1 ] || [ -z "$1" ]; then
    echo "error: usage: benchmarks/gpu_check.sh OUT_DIR (a folder for the logs and summary.tsv)" >&2
    exit 2
fi
if ! mkdir -p -- "$1" 2>/dev/null || [ ! -w "$1" ]; then
    echo "error: cannot create or write the folder $1; choose a writable OUT_DIR" >&2
    exit 1
fi
OUT=$(cd -- "$1" && pwd)
cd -- "$(dirname -- "$0")/.." || { echo "error: cannot enter the repository root above $0" >&2; exit 1; }
PY=${PYTHON:-python}

ROWS=""
FAILED=0

# step NAME LIMIT_S COMMAND...: run COMMAND under `timeout LIMIT_S`, tee its output, record its exit code
step() {
    local name=$1 limit=$2 start rc
    shift 2
    echo
    echo "=== $name (limit ${limit}s): $*"
    start=$(date +%s)
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    ROWS+="$name	$rc	$(( $(date +%s) - start ))	$name.log"$'\n'
    if [ "$rc" -ne 0 ]; then
        FAILED=1
        echo "=== $name: FAILED (exit $rc)"
    fi
}

date -u
step nvidia-smi 20 nvidia-smi
step cuda 45 "$PY" -c "import torch; assert torch.cuda.is_available(), 'CUDA is not available to torch'; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
step pytest-gpu 120 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests
step bench-images 240 "$PY" benchmarks/bench_images.py --device cuda --model ddpmpp --batch 48 --reg-batch 8 \
    --variants dsm fpe-p1 --repeats 3
step bench-train-step 75 "$PY" benchmarks/bench_train_step.py --device cuda
step bench-residual 40 "$PY" benchmarks/bench_residual.py --quick
step bench-likelihood 40 "$PY" benchmarks/bench_likelihood.py --quick

printf 'step\texit\tseconds\tlog\n%s' "$ROWS" > "$OUT/.summary.tsv.tmp" && mv -f "$OUT/.summary.tsv.tmp" "$OUT/summary.tsv"
echo
echo "=== summary ($OUT/summary.tsv)"
cat "$OUT/summary.tsv"
exit "$FAILED"
