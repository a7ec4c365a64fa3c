#!/usr/bin/env bash
# Everything this project checks and measures on a GPU, in one call (device time is scarce; see README, Measurements):
#   bash benchmarks/gpu_session.sh [OUTDIR [PART ...]]   # PART: kernels model train sample (the default), modes, profile
# 1. the kernel's self-check (python kernels.py) and timings (benchmarks/attention.py), 2. the model against the
# golden values on CUDA (benchmarks/gpu_checks.py), 3. training tokens/s and MFU of the 0.5B-shaped model with
# packing (train.py), 4. decode against transformers (benchmarks/sample_vs_reference.py);
# modes (by name): the full, LoRA and FSDP fine-tunes of benchmarks/train_modes.sh;
# profile (by name): where the time of the `train` part's steps goes (benchmarks/profile_train.py, GPU busy share).
# Each part has its own time limit, so one that hangs does not cost the others; each writes OUTDIR/<part>.txt.
set -u
out=${1:-/tmp/gpu-session}
parts=" ${*:2} "
[ "$parts" = "  " ] && parts=" kernels model train sample "
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
part() {   # part NAME SECONDS COMMAND...: run with a time limit, log to OUTDIR/NAME.txt
  local name=$1 limit=$2; shift 2
  [[ $parts == *" $name "* ]] || return 0
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  local rc=$?
  tail -n 40 "$out/$name.txt"
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
}
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $py -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
  'transformers', transformers.__version__)"; } 2>&1 | tee "$out/env.txt"
part kernels 480 bash -c "$py kernels.py && $py benchmarks/attention.py"   # meant to fit 8 min; not yet run
part model 100 $py benchmarks/gpu_checks.py
part train 170 bash -c "$py data/make_m4.py --out /tmp/m4 --train 300 --val 1 --seed 0 && $py train.py \
  --init 0.5b-random --data /tmp/m4/train.json --out /tmp/train-bench --steps 30 --batch 64 --budget 16384 \
  --save-every 0"
part modes 420 bash benchmarks/train_modes.sh   # full, LoRA, FSDP: tokens/s, MFU, plan vs peak; not yet run
part profile 170 bash -c "{ [ -f /tmp/m4/train.json ] || $py data/make_m4.py --out /tmp/m4 --train 300 --val 1 \
  --seed 0; } && $py benchmarks/profile_train.py --init 0.5b-random --data /tmp/m4/train.json --out /tmp/train-prof \
  --steps 11 --batch 64 --budget 16384 --save-every 0"   # the train part's data, drawn once
part sample 120 $py benchmarks/sample_vs_reference.py --ref-python "$py" --repeats 5 \
  --dir /tmp/interleave-0.5b-hf-random
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu,power.draw --format=csv | tee -a "$out/env.txt"
