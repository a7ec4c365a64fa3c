"""Train variants of train.py's "tiny" preset on one data set, one after another, to see which architecture learns
the synthetic tasks, and how long a step takes. On a GPU machine (see benchmarks/gpu_session.sh, part tiny):

    python benchmarks/tiny_variants.py OUT p16 p8 -- --data D/train.json --val D/val.json --steps 8000 ...
    python benchmarks/tiny_variants.py OUT p16 --fit 420 -- --data D/train.json --val D/val.json ...

Each variant runs `train.py --init tiny --out OUT/VARIANT --export OUT/VARIANT/export ARGS...` with the preset's
vision (or text) fields changed as VARIANTS says; its log is OUT/VARIANT.log. The last lines print each variant's
final held-out exact match. With --fit SECONDS (one variant, ARGS without --steps): 100 steps without evaluations
first (OUT/VARIANT-time.log), then one run of as many steps as fit in what is left of SECONDS (at most 24,000),
so that a lent GPU's limited time trains the longest run it can. The winner becomes the preset, so that the plain
train.py command reproduces it. One at a time: three runs sharing an H200 (and its 16 cores) took 0.55-0.75 s per
step each (2026-11-27). On the CPU (2026-11-27, one thread, 6,000 steps), 4 tower layers learnt more slowly than 2.
"""
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {   # name -> (vision fields, text fields) that differ from PRESETS["tiny"]
    "p16": ({}, {}),                                       # the preset as it is: 16 slots per 64-pixel image
    "p8": ({"patch_size": 8}, {}),                         # 64 slots per image: a 16-pixel mark spans 2 x 2 patches
    "p8-l4": ({"patch_size": 8, "layers": 4}, {}),         # and a deeper tower
    "p16-l4": ({"layers": 4}, {}),
}
RUN = ("import json, sys, train; vision, text = json.loads(sys.argv[1]); train.PRESETS['tiny'][0].update(vision); "
       "train.PRESETS['tiny'][1].update(text); print('preset tiny:', train.PRESETS['tiny'], flush=True); "
       "train.main(sys.argv[2:])")
running = []   # the train.py process now running, for stop()


def train(out, name, run_name, args):
    """One train.py run of a variant, in OUT/RUN_NAME, logged to OUT/RUN_NAME.log; returns the log's lines."""
    folder = os.path.join(out, run_name)
    cmd = [sys.executable, "-c", RUN, json.dumps(VARIANTS[name]), "--init", "tiny", "--out", folder,
           "--export", os.path.join(folder, "export"), *args]   # a flag given again in args wins (argparse)
    with open(folder + ".log", "w") as log:
        running[:] = [subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)]
        running[0].wait()
    return open(folder + ".log").read().splitlines()


def stop(*_):
    """A time limit (gpu_session.sh's `timeout`) stops this process: stop the run too, so the logs can be collected."""
    for proc in running:
        proc.kill()
    sys.exit(1)


def main(argv):
    out, rest = argv[0], argv[1:]
    names, args = (rest[:rest.index("--")], rest[rest.index("--") + 1:]) if "--" in rest else (rest, [])
    fit = float(names.pop(names.index("--fit") + 1)) if "--fit" in names else None
    names = [n for n in names if n != "--fit"]
    if fit and len(names) != 1:
        sys.exit(f"--fit times and trains one variant; got {len(names)}: {' '.join(names)}")
    os.makedirs(out, exist_ok=True)
    signal.signal(signal.SIGTERM, stop)
    started = time.time()
    for name in names:
        if fit:   # the timing run: no held-out set (its evaluation would be timed too), no checkpoint, export, stage 0
            train(out, name, name + "-time", args + ["--steps", "100", "--eval-every", "0", "--save-every", "0",
                                                     "--val", "", "--export", "", "--pretrain-tower", "0"])
            per_step = (time.time() - started) / 100   # start-up included: an over-estimate, on the safe side
            spare = 90 + 240 * ("--pretrain-tower" in args)   # evaluations and export; stage 0 (CPU, ~2.5 min)
            steps = min(24000, int((fit - (time.time() - started) - spare) / per_step))
            print(f"{name}: 100 steps took {100 * per_step:.0f} s with start-up; running {steps} steps", flush=True)
            if steps < 100:
                continue
            args = args + ["--steps", str(steps)]
        lines = train(out, name, name, args)
        evals, steps = [ln for ln in lines if ln.startswith("eval at")], [ln for ln in lines if ln.startswith("step ")]
        print(f"{name}: exit {running[0].returncode}; {evals[-1] if evals else 'no evaluation'}; "
              f"{steps[-1] if steps else 'no step'}; "
              f"{next((ln for ln in reversed(lines) if ln.startswith('done')), 'not done')}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
