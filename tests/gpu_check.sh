#!/usr/bin/env bash
# The GPU checks (docs/testing.md):
#   1. python -m pytest -q -m gpu (tests/test_gpu.py)
#   2. the sizing rows named in $ROWS (tests/gpu_sizing.sh; none unless set)
#   3. with QUICKSTART=1: the README's toy quick start, unchanged, with per-stage times
# Logs go to $OUT (or ./gpu_logs).
set -u
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, diffusers, transformers, kornia; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'kornia', kornia.__version__)"

echo "== 1. python -m pytest -q -m gpu"
t0=$SECONDS
timeout ${PYTEST_LIMIT:-540} python -m pytest -q -m gpu -s -p no:cacheprovider tests/test_gpu.py > "$OUT/pytest_gpu.log" 2>&1
echo "pytest -m gpu: exit $? in $((SECONDS - t0)) s"
grep -E "passed|failed|error|Eq. 8|export on CUDA|'speedup'|fig4:" "$OUT/pytest_gpu.log" | cut -c1-400 | tail -14

if [ -n "${ROWS:-}" ]; then
  echo "== 2. sizing rows: $ROWS"
  ROWS="$ROWS" OUT="$OUT" bash tests/gpu_sizing.sh
fi

if [ "${QUICKSTART:-0}" = 1 ]; then
  echo "== 3. README quick start (toy), per stage"
  rm -rf runs/toy; t_all=$SECONDS
  for s in 01_make_pairs 02_train_latent_lpips 03_ode_distill 04_gan_finetune 05_evaluate; do
    t0=$SECONDS
    timeout 200 python $s.py > "$OUT/qs_$s.log" 2>&1 || { echo "$s FAILED (exit $?)"; tail -5 "$OUT/qs_$s.log"; break; }
    echo "$s: $((SECONDS - t0)) s"
  done
  echo "quick start total: $((SECONDS - t_all)) s"
  tail -12 "$OUT/qs_05_evaluate.log"
fi
