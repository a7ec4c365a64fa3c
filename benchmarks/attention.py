"""The attention timings: kernels.attention beside PyTorch's attentions, bf16, on one GPU.

    python benchmarks/attention.py              # the table (GPU; not yet run: meant to fit 8 min)
    python benchmarks/attention.py --dry-run    # CPU: tiny cases in Triton's interpreter, wall-clock timer,
                                                # to check the script itself; its numbers mean nothing

TFLOP/s per case, forward, then forward+backward (counted as 3.5x the forward's FLOPs: FlashAttention-2's five
backward matmuls are 2.5x the forward's two). Columns:
  e2e      kernels.attention timed as the model calls it (triton.testing.do_bench): wrapper, launches, kernels;
  kernel   the same call captured in a CUDA graph (do_bench_cudagraph): the kernels alone, no launch overhead;
  cudnn, flash, effic   torch SDPA with one backend forced (sdpa_kernel: CUDNN_ATTENTION, FLASH_ATTENTION, i.e.
           FlashAttention-2, EFFICIENT_ATTENTION), CUDA-graph timed; packed rows go in zero-padded to
           (samples, heads, longest, D); "-" where the backend refuses the case;
  varlen   torch.nn.attention.varlen.varlen_attn (packed rows only), CUDA-graph timed;
  x cudnn, x flash   kernel / cudnn and kernel / flash.
Then the host time of one call (launch only: N calls timed without waiting for the GPU), ours and SDPA's.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.nn.functional import scaled_dot_product_attention as sdpa  # noqa: E402

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "effic": SDPBackend.EFFICIENT_ATTENTION}
COLUMNS = ["e2e", "kernel", "cudnn", "flash", "effic", "varlen"]


def gpu_cases():
    """(name, sample lengths, heads, D, causal): the model's cases first."""
    cases = [(f"vision {n:2}x729 H=16 D=72", [729] * n, 16, 72, False) for n in (8, 32)]
    packed = [1000, 3000, 500, 2000, 4096, 300, 1500, 3988]
    cases.append(("packed 8 samples, 16k H=32 D=128", packed, 32, 128, True))
    # The goals: T <= 2k (launch-bound) and T >= 8k, at D 64 and 128.
    for d, lengths in ((64, (1024, 8192, 16384)), (128, (1024, 2048, 8192, 16384))):
        for t in lengths:
            cases.append((f"prefill T={t:5} H=32 D={d}", [t], 32, d, True))
    return cases


def dry_cases():
    """Tiny cases for the interpreter: one of each kind."""
    return [("vision 2x9 H=2 D=72", [9, 9], 2, 72, False), ("packed 2 samples H=2 D=64", [5, 11], 2, 64, True),
            ("prefill T=16 H=2 D=64", [16], 2, 64, True)]


def wall_ms(fn):
    """Median wall-clock milliseconds of fn() over 3 runs (the dry run's timer)."""
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return 1e3 * statistics.median(seconds)


def rate(timer, fn, flop):
    """TFLOP/s of fn() under timer, or None ("-") when the case is refused or runs out of memory."""
    try:
        return flop / timer(fn) / 1e9
    except (RuntimeError, torch.cuda.OutOfMemoryError) as error:  # e.g. "No available kernel"
        print(f"    ({type(error).__name__}: {str(error).splitlines()[0][:90]})", file=sys.stderr)
        return None


def runs_for(lens, h, d, causal, device):
    """The callables of one case, by column: forward-only functions of their own inputs."""
    bf16 = dict(device=device, dtype=torch.bfloat16, requires_grad=True)
    x = [torch.randn(sum(lens), h, d, **bf16) for _ in range(3)]  # q, k, v: (T, H, D), packed
    xp = [torch.randn(len(lens), h, max(lens), d, **bf16) for _ in range(3)]  # (B, H, T, D), padded
    options = {}
    if len(lens) > 1:
        cu = torch.tensor([0] + lens, device=device).cumsum(0).int()
        options = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lens), max_seqlen_k=max(lens))

    def ours():
        """kernels.attention, as the model calls it."""
        return kernels.attention(*x, causal, **options)

    runs = {"e2e": (ours, x), "kernel": (ours, x)}
    for column, backend in BACKENDS.items():
        def forced(backend=backend):
            """SDPA with one backend forced."""
            with sdpa_kernel(backend):
                return sdpa(*xp, is_causal=causal)
        runs[column] = (forced, xp)
    if options:
        from torch.nn.attention.varlen import varlen_attn

        def varlen():
            """PyTorch's own variable-length attention on the packed rows."""
            return varlen_attn(*x, cu, cu, max(lens), max(lens), window_size=(-1, 0) if causal else (-1, -1))
        runs["varlen"] = (varlen, x)
    return runs


def table(cases, timers, device):
    """Print the forward and the forward+backward rows of every case."""
    head = f"{'case':34} |" + "".join(f"{c:>8}" for c in COLUMNS) + f"{'x cudnn':>9}{'x flash':>9}"
    rows = {"fwd": [], "fwd+bwd": []}
    for name, lens, h, d, causal in cases:
        flop = 4 * d * h * sum(n * (n + 1) // 2 if causal else n * n for n in lens)
        for column, (fn, inputs) in runs_for(lens, h, d, causal, device).items():
            if timers[column] is None:
                continue
            try:
                grad = torch.randn_like(fn())
            except RuntimeError as error:  # the backend refuses the case: its cells stay "-"
                print(f"    ({column}: {str(error).splitlines()[0][:90]})", file=sys.stderr)
                continue

            def both(fn=fn, inputs=inputs, grad=grad):
                """Forward and backward, gradients returned (nothing accumulates in .grad)."""
                return torch.autograd.grad(fn(), inputs, grad)

            timer = timers[column]
            rows["fwd"].append((name, column, rate(timer, fn, flop)))
            rows["fwd+bwd"].append((name, column, rate(timer, both, 3.5 * flop)))
    for kind, measured in rows.items():
        print(f"\n{kind}, TFLOP/s\n{head}")
        for name, *_ in cases:
            cells = {column: tflops for case, column, tflops in measured if case == name}
            line = "".join(f"{cells[c]:8.1f}" if cells.get(c) else "       -" for c in COLUMNS)
            for base in ("cudnn", "flash"):
                ratio = cells["kernel"] / cells[base] if cells.get("kernel") and cells.get(base) else None
                line += f"{ratio:8.2f}x" if ratio else "        -"
            print(f"{name:34} |{line}", flush=True)


def host_times(cases, device, calls):
    """Microseconds of host time per call (launch only): `calls` calls timed without a GPU wait."""
    print("\nhost time per call (launch only, the GPU not waited for), us")
    for name, lens, h, d, causal in cases:
        runs = runs_for(lens, h, d, causal, device)
        cells = []
        for column in ("kernel", "cudnn") if device == "cuda" else ("kernel",):
            fn = runs[column][0]
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            cells.append(f"{column.replace('kernel', 'ours')} {1e6 * (time.perf_counter() - start) / calls:7.1f}")
        print(f"{name:34} | " + "   ".join(cells), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU: tiny cases, wall-clock timer")
    args = parser.parse_args()
    if args.dry_run:
        timers = dict.fromkeys(COLUMNS, wall_ms)
        # The interpreter runs kernels.attention only; PyTorch's GPU attentions have no CPU form here.
        for column in ("cudnn", "flash", "effic", "varlen"):
            timers[column] = None
        cases = dry_cases()
        device = "cpu"
    elif torch.cuda.is_available():
        def e2e(fn):
            """Median ms of fn() as called from Python."""
            return triton.testing.do_bench(fn, return_mode="median")

        def graphed(fn):
            """Median ms of fn() replayed from a CUDA graph: the kernels alone."""
            return triton.testing.do_bench_cudagraph(fn, return_mode="median")
        timers = dict.fromkeys(COLUMNS, graphed)
        timers["e2e"] = e2e
        cases = gpu_cases()
        device = "cuda"
        print(f"bf16 on {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    else:
        raise SystemExit("no CUDA device: the timings need a GPU (try --dry-run to check the script on CPU)")
    table(cases, timers, device)
    host_times(cases[:1] + cases[2:4], device, calls=3 if args.dry_run else 200)


if __name__ == "__main__":
    main()
