"""Where a training step's time goes: train.py under torch.profiler (the GPU run's MFU is below its goal, and why was
never measured). ARGS are train.py's; gpu_session.sh's `profile` part runs the 0.5B-shaped fine-tuning of its
`train` part this way:

    python benchmarks/profile_train.py --init 0.5b-random --data D/train.json --steps 12 --batch 64 --budget 16384 ...

The first WAIT optimizer steps (Triton's autotuning, allocator warm-up) are skipped, the next ACTIVE recorded. Prints
the 25 operators that took the most device time (CPU time on a CPU), and on a GPU the share of the recorded wall
time that kernels kept the GPU busy, split into attention (kernels.py's and SDPA's), matrix products and the rest:
a low busy share means the host (data, Python, synchronisations) starves the GPU; a high one, slow kernels.
"""
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile, schedule

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

WAIT, ACTIVE = 5, 5
KINDS = {"attention": ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "flash", "fmha", "attention"),
         "matmul": ("gemm", "nvjet", "cutlass", "sm90_xmma", "matmul")}


def main(argv):
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
    stamps = []   # the time of every optimizer step: the recorded window is steps WAIT + 1 .. WAIT + 1 + ACTIVE
    with profile(activities=activities, schedule=schedule(wait=WAIT, warmup=1, active=ACTIVE, repeat=1)) as prof:
        adamw_step = torch.optim.AdamW.step

        def step_and_tick(self, *args, **kwargs):   # the profiler's schedule counts optimizer steps
            out = adamw_step(self, *args, **kwargs)
            if cuda:   # the step's kernels finished: the stamp marks its end
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            prof.step()
            return out
        torch.optim.AdamW.step = step_and_tick
        try:
            train.main(argv)
        finally:
            torch.optim.AdamW.step = adamw_step
    if len(stamps) < WAIT + 1 + ACTIVE:
        sys.exit(f"only {len(stamps)} steps ran: give --steps >= {WAIT + 1 + ACTIVE}")
    events = prof.key_averages()
    print(events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=25))
    wall = stamps[WAIT + ACTIVE] - stamps[WAIT]
    print(f"recorded: {ACTIVE} steps, {wall:.3f} s of wall time, {wall / ACTIVE * 1e3:.1f} ms per step")
    if cuda:
        busy = {kind: 0.0 for kind in (*KINDS, "other")}
        for e in events:
            if e.device_type == torch.autograd.DeviceType.CUDA:
                kind = next((k for k, names in KINDS.items() if any(n in e.key for n in names)), "other")
                busy[kind] += e.self_device_time_total / 1e6   # microseconds
        print(f"GPU busy {100 * sum(busy.values()) / wall:.1f}% of the wall time: " +
              ", ".join(f"{kind} {100 * s / wall:.1f}%" for kind, s in busy.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
