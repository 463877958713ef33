#!/usr/bin/env bash
# The README's quick start at one or more commits, side by side on this machine: a clean
# `git archive` of each into a temporary folder, one quick start after the other, the
# seconds of each stage. Run it with nothing else running. PRESET=toy_sd times the second.
#   bash tests/quickstart_timing.sh HEAD~5 HEAD
#   PRESET=toy_sd bash tests/quickstart_timing.sh HEAD
set -u
root=$(git rev-parse --show-toplevel); work=$(mktemp -d)
preset=${PRESET:-toy}
echo "preset $preset; machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; $(date -u)"
for rev in "$@"; do
  dir="$work/$rev"; mkdir -p "$dir"; git -C "$root" archive "$rev" | tar -x -C "$dir"
  line="$rev:"; t0=$SECONDS
  for s in 01_make_pairs 02_train_latent_lpips 03_ode_distill 04_gan_finetune 05_evaluate; do
    t=$SECONDS
    (cd "$dir" && python $s.py --preset "$preset" > "$work/${rev}_$s.log" 2>&1) || { echo "$rev: $s failed (log: $work/${rev}_$s.log)"; exit 1; }
    line="$line $s=$((SECONDS - t))"
  done
  echo "$line total=$((SECONDS - t0))"; grep -h "^| " "$work/${rev}_05_evaluate.log"
done
echo "logs and runs in $work"
