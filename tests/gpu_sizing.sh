#!/usr/bin/env bash
# The sizing runs on one GPU: real SD1.5/SDXL architectures with random
# weights (--teacher random: built once per kind under runs/size_<kind>), bf16.
# Each "benchmark: {...}" line is one row of the sizing table in docs/scaling.md.
#   bash tests/gpu_sizing.sh                      every row (about 15 minutes)
#   ROWS="sd15_s1_b32 sd15_pairs" bash tests/gpu_sizing.sh   some rows
set -u
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
N=${N:-5}
ROWS=${ROWS:-"sd15_s1_b32 sd15_s2_b16 sd15_s2_b16_ckpt sd15_s2_b8 sd15_pairs sdxl_s1_b8_ckpt sdxl_s2_b4_ckpt sd15_s2_b16_fsdp1 sd15_s2_b16_fsdp1_r1 sdxl_s2_b4_fsdp1 sdxl_s2_b4_fsdp sd15_speed sdxl_speed"}
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
TR="torchrun --standalone --nproc_per_node"
printf 'a photo of a cat\na red car on a street\n' > /tmp/prompts.txt
SD15="--preset sd15 --teacher random --out_dir runs/size_sd15 --dtype bfloat16"
SDXL="--preset sdxl --teacher random --out_dir runs/size_sdxl --dtype bfloat16"
T15="--preset sd15 --teacher random --out_dir runs/size_sd15"  # 01 and 05: the teacher in the preset's --teacher_dtype
TXL="--preset sdxl --teacher random --out_dir runs/size_sdxl"
run() {  # name, timeout, command...
  local name=$1 limit=$2; shift 2
  [[ " $ROWS " == *" $name "* ]] || return 0
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/size_$name.log" 2>&1
  echo "$name: exit $? in $((SECONDS - t0)) s"
  grep -h "^benchmark: {\|^{\|pairs_s\|ours_over\|OutOfMemoryError\|^error" "$OUT/size_$name.log" | tail -4 | cut -c1-1200
}
run sd15_s1_b32 180 python 03_ode_distill.py $SD15 --benchmark_steps $N --batch 32 --batch_per_device 32
run sd15_s2_b16 180 python 04_gan_finetune.py $SD15 --benchmark_steps $N --batch 16 --batch_per_device 16 --r1_every 2
run sd15_s2_b16_ckpt 180 python 04_gan_finetune.py $SD15 --benchmark_steps $N --batch 16 --batch_per_device 16 --r1_every 2 --grad_ckpt
run sd15_s2_b8 180 python 04_gan_finetune.py $SD15 --benchmark_steps $N --batch 8 --batch_per_device 8 --r1_every 2
run sd15_pairs 150 python 01_make_pairs.py $T15 --benchmark --batch_per_device 16 --num_steps 50 --prompts /tmp/prompts.txt --cycle_prompts
run sdxl_s1_b8_ckpt 240 python 03_ode_distill.py $SDXL --benchmark_steps $N --batch 8 --batch_per_device 8 --grad_ckpt
run sdxl_s2_b4_ckpt 180 python 04_gan_finetune.py $SDXL --benchmark_steps $N --batch 4 --batch_per_device 4 --grad_ckpt
# --fsdp: on one GPU it only shows that the sharded path runs (sd15_s2_b16_fsdp1 was measured without R1, when
# --fsdp refused it; sd15_s2_b16_fsdp1_r1 has it every 2 steps);
# SDXL stage 2 needs 2 or more 80 GB GPUs (model state 92.5 GB / NGPU), or one GPU with more memory (an H200):
# there its held_gb and peak_gb give the per-GPU arithmetic for N GPUs (docs/scaling.md)
run sd15_s2_b16_fsdp1 150 $TR=1 04_gan_finetune.py $SD15 --benchmark_steps $N --batch 16 --batch_per_device 16 --grad_ckpt --r1_gamma 0 --fsdp
run sd15_s2_b16_fsdp1_r1 150 $TR=1 04_gan_finetune.py $SD15 --benchmark_steps $N --batch 16 --batch_per_device 16 --grad_ckpt --r1_every 2 --fsdp
GPU_GB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
if [ "${GPU_GB:-0}" -ge 120000 ]; then
  run sdxl_s2_b4_fsdp1 300 $TR=1 04_gan_finetune.py $SDXL --benchmark_steps $N --batch 4 --batch_per_device 4 --grad_ckpt --fsdp
else
  [[ " $ROWS " == *" sdxl_s2_b4_fsdp1 "* ]] && echo "sdxl_s2_b4_fsdp1: skipped, this GPU has ${GPU_GB:-?} MiB (needs about 100 GB)"
fi
if [ "$NGPU" -ge 2 ]; then
  run sdxl_s2_b4_fsdp 300 $TR=$NGPU 04_gan_finetune.py $SDXL --benchmark_steps $N --batch $((4 * NGPU)) --batch_per_device 4 --grad_ckpt --fsdp
else
  [[ " $ROWS " == *" sdxl_s2_b4_fsdp "* ]] && echo "sdxl_s2_b4_fsdp: skipped, this machine has $NGPU GPU(s)"
fi
# Fig. 3: the one-step student vs 50-step DDIM + CFG, per latent and per image (VAE decode added to both)
run sd15_speed 200 python 05_evaluate.py $T15 --speed
run sdxl_speed 300 python 05_evaluate.py $TXL --speed
for k in sd15 sdxl; do  # 05 writes its report as indented JSON: one line of it per kind
  [[ " $ROWS " == *" ${k}_speed "* ]] && [ -f runs/size_$k/eval/speed.json ] && echo "${k}_speed: $(tr -d ' \n' < runs/size_$k/eval/speed.json)" || true
done
