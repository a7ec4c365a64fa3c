#!/usr/bin/env bash
# Issue 19's GPU goals side by side: one checkpoint fine-tuned three ways (full, LoRA rank 64, FSDP2 in one
# process), each run printing its memory plan before step 1, its tokens/s and MFU every 10 steps, and the peak
# GPU memory it allocated at the end (train.py prints all three). gpu_session.sh runs it as its `modes` part.
#   bash benchmarks/train_modes.sh [INIT [STEPS [BATCH [BUDGET]]]]   # defaults: 0.5b-random 20 64 16384
# On a CPU, `bash benchmarks/train_modes.sh tiny 2 4 512` checks that it runs (no memory peak is printed there).
set -eu
init=${1:-0.5b-random}
steps=${2:-20}
batch=${3:-64}
budget=${4:-16384}
py=${PYTHON:-python3}
work=${TMPDIR:-/tmp}/train-modes
rm -rf "$work"
mkdir -p "$work"
# the data of gpu_session.sh's train part, and one checkpoint of the model's shapes that the three runs start from
$py data/make_m4.py --out "$work/m4" --train 300 --val 1 --seed 0
$py train.py --init "$init" --data "$work/m4/train.json" --out "$work/init" --steps 1 --batch 4 \
  --budget "$budget" --save-every 0 --export "$work/start"
common=(--init "$work/start" --data "$work/m4/train.json" --steps "$steps" --batch "$batch" --budget "$budget"
  --save-every 0 --eval-every 0)
echo "--- full fine-tune"
$py train.py "${common[@]}" --out "$work/full"
echo "--- LoRA, rank 64"
$py train.py "${common[@]}" --out "$work/lora" --lora 64
echo "--- FSDP2, one process"
$py -m torch.distributed.run --standalone --nproc_per_node 1 train.py "${common[@]}" --out "$work/fsdp" --fsdp
