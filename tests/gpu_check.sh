#!/usr/bin/env bash
# Issue 12's GPU check, as run on a lent GPU (see the README, "Tests on a GPU"):
#   1. the gpu-marked tests; 2. the same tests' toy pipeline on the code before the
#   fix (an old checkout in .old/, if present: it must fail); 3. the README's toy
#   quick start, unchanged, with per-stage times. Logs go to $OUT (or ./gpu_logs).
set -u
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, diffusers, transformers, kornia; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'kornia', kornia.__version__)"

echo "== 1. python -m pytest -q -m gpu"
t0=$SECONDS
timeout 300 python -m pytest -q -m gpu -s -p no:cacheprovider tests/test_gpu.py > "$OUT/pytest_gpu.log" 2>&1
echo "pytest -m gpu: exit $? in $((SECONDS - t0)) s"; grep -E "passed|failed|Eq. 8|export on CUDA|speedup" "$OUT/pytest_gpu.log" | tail -12

if [ -d .old ]; then
  echo "== 2. the same toy test on the code before the fix (51984d5): expected to FAIL"
  t0=$SECONDS
  (cd .old && timeout 120 python -m pytest -q -m gpu -x tests/test_gpu.py -k toy_pipeline > "$OUT/old_code.log" 2>&1)
  echo "old code: exit $? in $((SECONDS - t0)) s"; grep -E "RuntimeError|Expected all tensors|passed|failed" "$OUT/old_code.log" | head -5
fi

echo "== 3. README quick start (toy), per stage"
rm -rf runs/toy; t_all=$SECONDS
for s in 01_make_pairs 02_train_latent_lpips 03_ode_distill 04_gan_finetune 05_evaluate; do
  t0=$SECONDS
  timeout 200 python $s.py > "$OUT/qs_$s.log" 2>&1 || { echo "$s FAILED (exit $?)"; tail -5 "$OUT/qs_$s.log"; break; }
  echo "$s: $((SECONDS - t0)) s"
done
echo "quick start total: $((SECONDS - t_all)) s"
tail -12 "$OUT/qs_05_evaluate.log"
cp runs/toy/eval/compare.png "$OUT/" 2>/dev/null
