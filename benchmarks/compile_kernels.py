"""Compile every kernel of kernels.py for a GPU target on a machine without one (Triton's compiler needs no GPU).

    python benchmarks/compile_kernels.py                   # sm_90 (H100/H200), bf16, head dims 64 72 128 40 256
    python benchmarks/compile_kernels.py --dims 72 --dtype fp32

The interpreter, which runs the CPU tests, accepts code that the compiler refuses; this catches that before device
time is spent. Every combination the wrapper launches: one sample, packed by maximum, packed by search; causal or
not; the backward with and without atomic dq. Compiling is not running: resources (shared memory) and speed are
the GPU's to check.
"""
import argparse
import itertools
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"  # before kernels imports triton
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

INTS = ["stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "n_heads", "n_kv_heads",
        "total_q", "len_q", "len_k", "n_samples", "SEQ_POW2", "n_rows"]


def compile_kernel(kernel, types, constexprs, target):
    """Compile one kernel (an autotuned one through its JIT function) with these constexprs."""
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    signature = {name: "constexpr" if name in constexprs else types[name] for name in fn.arg_names}
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 72, 128, 40, 256])
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    types = dict.fromkeys(INTS, "i32")
    types.update(sm_scale="fp32", CU_Q="*i32", CU_K="*i32", TILES="*i32")
    types.update(dict.fromkeys(["Q", "K", "V", "O", "DO", "DQ", "DK", "DV"], "*" + args.dtype))
    types.update(dict.fromkeys(["LSE", "DELTA", "DQ_ACC"], "*fp32"))
    layouts = [(False, False), (True, False), (True, True)]  # (PACKED, SEARCH)
    start = time.perf_counter()
    compiled = 0
    for d, (packed, search), causal in itertools.product(args.dims, layouts, [False, True]):
        d_main, d_rest = kernels._split_head_dim(d)
        blocks = dict(BLOCK_M=64, BLOCK_N=64) if d <= 128 else dict(BLOCK_M=32, BLOCK_N=32)
        shared = dict(HEAD_DIM=d, D_MAIN=d_main, D_REST=d_rest, PACKED=packed, SEARCH=search, CAUSAL=causal,
                      DOT="tf32x3" if args.dtype == "fp32" else "tf32", **blocks)
        compile_kernel(kernels._fwd_kernel, types, dict(shared, COUNT=False), target)
        compile_kernel(kernels._bwd_dq_kernel, types, shared, target)
        for atomic in (False, True):
            compile_kernel(kernels._bwd_dkdv_kernel, types, dict(shared, ATOMIC_DQ=atomic), target)
        compiled += 4
    for d in args.dims:
        delta = dict(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK=64)
        compile_kernel(kernels._bwd_delta_kernel, types, delta, target)
        compiled += 1
    print(f"compiled {compiled} kernels for sm_{args.arch}, {args.dtype}, head dims {args.dims} "
          f"in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
