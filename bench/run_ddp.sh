#!/usr/bin/env bash
# Issue 12 on a 2-GPU machine: SDXL 1024 throughput on 1 and 2 GPUs (bf16, per-GPU batch 2)
# and the 2-GPU vs 1-GPU-doubled-batch equivalence check (fp32, 512 px, 5 steps).
# Usage (device): bash bench/run_ddp.sh OUTDIR
set -euo pipefail
out=${1:?output dir}
mkdir -p "$out"
run() { torchrun --standalone --nproc_per_node "$1" bench/bench_ddp.py "${@:2}"; }
run 1 --per_gpu_batch 2 --steps 10 --warmup 3 --out /tmp/g1b2
run 2 --per_gpu_batch 2 --steps 10 --warmup 3 --out /tmp/g2b2
run 1 --per_gpu_batch 4 --steps 5 --warmup 0 --dtype fp32 --reso 512 --out /tmp/e1
run 2 --per_gpu_batch 2 --steps 5 --warmup 0 --dtype fp32 --reso 512 --out /tmp/e2
python3 bench/bench_ddp.py --compare /tmp/e2 /tmp/e1 | tee "$out/compare.json"
for d in g1b2 g2b2 e1 e2; do cp /tmp/$d/result.json "$out/$d.json"; done
