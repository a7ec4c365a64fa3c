"""kernels.py: one hand-written Triton flash-attention kernel family, forward and backward.

Every attention of the model goes through `attention(q, k, v, ...)`: the vision tower
(bidirectional), the decoder (causal, also with fewer queries than cached keys), packed
variable-length batches (`cu_seqlens`) and grouped-query attention (GQA: several query heads
share one K/V head).

FlashAttention-2: never build the (queries x keys) score matrix. A program owns a block of queries,
walks over blocks of keys and keeps a running ("online") softmax in fp32: the row maximum m, the
denominator l and the un-normalised output acc. When a key block raises the maximum, the old l and
acc are rescaled by exp(m_old - m_new); after the last block, out = acc / l. The forward also keeps
lse = m + log(l) per query, so the backward recomputes the probabilities p = exp(s - lse) tile by
tile instead of storing them.

Layout: q (total_q, n_heads, D), k and v (total_k, n_kv_heads, D), samples packed one after
another; cu_seqlens_q/k (int32, [0, ..., total]) say where each starts. The kernels take the
strides of q, k, v, so views (slices of a fused qkv tensor) are not copied while D is contiguous;
outputs and gradients are contiguous. Without CUDA, this module sets TRITON_INTERPRET=1 before
importing Triton: the same kernels then run (slowly) in Triton's numpy interpreter, which is how
the CPU tests check them.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit decorates anything
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
# Every output buffer comes from here; the tests swap in a NaN-filled allocator.
_empty = torch.empty

if INTERPRET:
    # Triton's numpy interpreter has no bfloat16: it keeps bf16 as raw uint16 bits, its tl.dot
    # multiplies those bits as integers, and its fp32 -> bf16 cast truncates. Fix both (CPU only),
    # so that the kernels, unchanged, round to bf16 as a GPU does (to nearest even; exact products).
    import numpy as np
    from triton.runtime import interpreter as _interp

    def _convert_float(x, src, dst, rounding, _convert=_interp._convert_float):
        """fp32 -> bf16 rounds to nearest even (through torch), as the interpreter's raw bits."""
        if src == tl.float32 and dst == tl.bfloat16:
            rounded = torch.from_numpy(np.asarray(x, np.float32)).bfloat16()
            return rounded.view(torch.int16).numpy().view(np.uint16)
        return _convert(x, src, dst, rounding)

    def _create_dot(self, a, b, *rest, _dot=_interp.InterpreterBuilder.create_dot):
        """tl.dot of bf16 tiles widens them to fp32 (exactly) first: it multiplies values."""
        a, b = [self.cast_impl(x, tl.float32) if x.dtype == tl.bfloat16 else x for x in (a, b)]
        return _dot(self, a, b, *rest)

    _interp._convert_float = _convert_float
    _interp.InterpreterBuilder.create_dot = _create_dot


def _autotune(interpret_blocks, gpu_choices):
    """Pick (BLOCK_M, BLOCK_N) and launch settings: one small fixed choice in the interpreter; on a
    GPU a few that the autotuner times once per (head dim, causal, dtypes, length rounded up to
    2^k) and then reuses. The last, small one fits in shared memory in every case (fp32 with
    D = 256 too); the others are faster. gpu_choices: (BLOCK_M, BLOCK_N, num_warps, num_stages).
    BLOCK_M and BLOCK_N come from these configs, so a launch must not pass them too."""
    if INTERPRET:
        block_m, block_n = interpret_blocks
        configs = [triton.Config(dict(BLOCK_M=block_m, BLOCK_N=block_n), num_warps=4, num_stages=1)]
    else:
        configs = [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s)
                   for m, n, w, s in gpu_choices + [(32, 32, 4, 1)]]
    return triton.autotune(configs, key=["HEAD_DIM", "CAUSAL", "SEQ_POW2"])


# ==== Helpers the kernels share

@triton.jit
def _segment(CU_Q, CU_K, seg):
    """Where sample `seg` starts and how long it is, in queries and in keys."""
    q_start = tl.load(CU_Q + seg)
    k_start = tl.load(CU_K + seg)
    Lq = tl.load(CU_Q + seg + 1) - q_start
    Lk = tl.load(CU_K + seg + 1) - k_start
    return q_start, k_start, Lq, Lk


@triton.jit
def _rows(P, offs, n, stride, offs_d, HEAD_DIM: tl.constexpr):
    """Load rows `offs` of a (n, HEAD_DIM) matrix as a (len(offs), BLOCK_D) tile. Rows >= n (past
    the sample's end) and columns >= HEAD_DIM (D rounded up to a power of two) read 0: they add 0
    to dots."""
    inside = (offs[:, None] < n) & (offs_d[None, :] < HEAD_DIM)
    return tl.load(P + offs[:, None] * stride + offs_d[None, :], mask=inside, other=0.0)


@triton.jit
def _put_rows(P, offs, n, stride, offs_d, x, HEAD_DIM: tl.constexpr):
    """Store the valid part of a tile written by _rows' rules, in P's dtype."""
    inside = (offs[:, None] < n) & (offs_d[None, :] < HEAD_DIM)
    tl.store(P + offs[:, None] * stride + offs_d[None, :], x.to(P.dtype.element_ty), mask=inside)


@triton.jit
def _visible(offs_m, offs_n, Lk, shift, CAUSAL: tl.constexpr):
    """(BM, BN) mask of the keys a query may see: in the sample and, if causal, j <= i + shift."""
    see = offs_n[None, :] < Lk
    if CAUSAL:
        see = see & (offs_n[None, :] <= offs_m[:, None] + shift)
    return see


@triton.jit
def _key_range(m0, Lq, Lk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Key blocks the query block [m0, m0 + BLOCK_M) of one sample visits: [0, full) need no
    mask, [full, end) need one. Keys of other samples are never visited: the loops only run inside
    this one. Causal: query i sees key j iff j <= i + (Lk - Lq), the diagonal aligned to the
    bottom-right corner, so cached keys (Lk > Lq) are all visible. Key blocks past the diagonal of
    the block's last row are skipped entirely; this is what halves the work of causal attention."""
    full = Lk
    end = Lk
    if CAUSAL:
        end = tl.minimum(Lk, m0 + BLOCK_M + Lk - Lq)  # one past the last key the last row sees
        full = tl.minimum(Lk, m0 + 1 + Lk - Lq)  # keys the first row (so every row) sees
    # A partly visible block goes to the masked loop: round `full` down to a whole block.
    return tl.maximum(full, 0) // BLOCK_N * BLOCK_N, end


# ==== The kernels: forward, then the backward in two parts (dq; dk and dv)

@_autotune((32, 16), [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 8, 3)])
@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K, TILES,  # pointers
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,  # strides: token, head
    n_heads, n_kv_heads, total_q, sm_scale, SEQ_POW2,  # sizes, scale, autotune length key
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,  # D, and D rounded up to 2^k
    CAUSAL: tl.constexpr, DOT: tl.constexpr, COUNT: tl.constexpr,  # switches, dot precision
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # from the autotune configs
):
    """Forward. One program = one block of BLOCK_M queries of one sample, for one head. Writes O
    (contiguous, shaped as q) and LSE ((n_heads, total_q) fp32, log2 units); counts tiles in TILES
    if COUNT."""
    # ---- which queries: a block of one sample, one head
    # Last query blocks first: causal ones see the most keys; the heaviest work must not start last.
    m_block = tl.num_programs(0) - 1 - tl.program_id(0)
    seg = tl.program_id(1)
    head = tl.program_id(2)
    q_start, k_start, Lq, Lk = _segment(CU_Q, CU_K, seg)
    m0 = m_block * BLOCK_M
    if m0 >= Lq:  # the grid is sized for the longest sample; shorter ones end here
        return
    # GQA: a group of query heads reads one K/V head, uncopied.
    kv_head = head // (n_heads // n_kv_heads)
    # Scores in log2 units: exp(x) = exp2(x * log2(e)), and exp2 is fast.
    qk_scale = sm_scale * 1.4426950408889634
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)  # BLOCK_D: D rounded up to 2^k
    Q += q_start.to(tl.int64) * stride_qt + head * stride_qh  # this sample's queries, this head
    q = _rows(Q, offs_m, Lq, stride_qt, offs_d, HEAD_DIM)  # (BM, BD)
    K += k_start.to(tl.int64) * stride_kt + kv_head * stride_kh  # this sample's keys, this K/V head
    V += k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    # ---- the online softmax over the key blocks
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running row maximum
    l_i = tl.zeros((BLOCK_M,), tl.float32)  # running denominator
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)  # running numerator
    full, end = _key_range(m0, Lq, Lk, BLOCK_M, BLOCK_N, CAUSAL)
    # The same loop twice: key blocks [0, full) unmasked, then [full, end) masked.
    for MASKED in tl.static_range(2):
        for n0 in range(full if MASKED else 0, end if MASKED else full, BLOCK_N):
            # -- load a block of keys and values
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k = _rows(K, offs_n, Lk, stride_kt, offs_d, HEAD_DIM)  # (BN, BD)
            v = _rows(V, offs_n, Lk, stride_vt, offs_d, HEAD_DIM)  # (BN, BD)
            # -- compute the scores, in log2 units
            s = tl.dot(q, tl.trans(k), input_precision=DOT) * qk_scale  # (BM, BN)
            # Only the blocks on the diagonal or at the sample's end pay for the mask.
            if MASKED:
                s = tl.where(_visible(offs_m, offs_n, Lk, Lk - Lq, CAUSAL), s, float("-inf"))
            # -- update m_i and l_i
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no key has m = -inf: subtract 0, so that exp2(-inf) = 0, not NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])  # (BM, BN) un-normalised probabilities
            # How much the old running sums shrink under the new maximum.
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            # -- update acc
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT)
            m_i = m_new
            if COUNT:  # test hook: count the (query block, key block) tiles really computed
                tl.atomic_add(TILES, 1)
    # ---- write out = acc / l and lse
    # A query that sees no key (causal with Lq > Lk: the first Lq - Lk rows) has l = 0: it outputs
    # zeros, and lse = +inf makes its recomputed probabilities exactly 0 in the backward.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    O += q_start.to(tl.int64) * n_heads * HEAD_DIM + head * HEAD_DIM  # contiguous (total_q, H, D)
    _put_rows(O, offs_m, Lq, n_heads * HEAD_DIM, offs_d, acc / l_safe[:, None], HEAD_DIM)
    # lse: log2 of the softmax denominator (in log2 units, as the scores)
    lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(LSE + head * total_q + q_start + offs_m, lse, mask=offs_m < Lq)


@_autotune((32, 16), [(128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 8, 3), (64, 64, 4, 3)])
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, CU_Q, CU_K,  # pointers
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,  # strides: token, head
    n_heads, n_kv_heads, total_q, sm_scale, SEQ_POW2,  # sizes, scale, autotune length key
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,  # D, and D rounded up to 2^k
    CAUSAL: tl.constexpr, DOT: tl.constexpr,  # switch, dot precision
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # from the autotune configs
):
    """Backward, part 1: dq = scale * dS @ K for one block of queries, over the forward's key
    blocks, recomputing P = exp2(s - lse). It also writes delta = rowsum(dO * O), which part 2
    reads."""
    # ---- which queries: the forward's block of one sample, one head
    m_block = tl.num_programs(0) - 1 - tl.program_id(0)
    seg = tl.program_id(1)
    head = tl.program_id(2)
    q_start, k_start, Lq, Lk = _segment(CU_Q, CU_K, seg)
    m0 = m_block * BLOCK_M
    if m0 >= Lq:
        return
    kv_head = head // (n_heads // n_kv_heads)
    qk_scale = sm_scale * 1.4426950408889634
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    # ---- the block's q, dO and lse; delta = rowsum(dO * O)
    Q += q_start.to(tl.int64) * stride_qt + head * stride_qh
    q = _rows(Q, offs_m, Lq, stride_qt, offs_d, HEAD_DIM)  # (BM, BD)
    rows = q_start.to(tl.int64) * n_heads * HEAD_DIM + head * HEAD_DIM  # O, dO, dQ: contiguous
    do = _rows(DO + rows, offs_m, Lq, n_heads * HEAD_DIM, offs_d, HEAD_DIM)  # (BM, BD)
    o = _rows(O + rows, offs_m, Lq, n_heads * HEAD_DIM, offs_d, HEAD_DIM)  # (BM, BD)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BM,)
    tl.store(DELTA + head * total_q + q_start + offs_m, delta, mask=offs_m < Lq)
    lse = tl.load(LSE + head * total_q + q_start + offs_m, mask=offs_m < Lq, other=float("inf"))
    K += k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    V += k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    # ---- dq over the key blocks the forward visited
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    full, end = _key_range(m0, Lq, Lk, BLOCK_M, BLOCK_N, CAUSAL)
    for MASKED in tl.static_range(2):
        for n0 in range(full if MASKED else 0, end if MASKED else full, BLOCK_N):
            # -- load a block of keys and values
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k = _rows(K, offs_n, Lk, stride_kt, offs_d, HEAD_DIM)  # (BN, BD)
            v = _rows(V, offs_n, Lk, stride_vt, offs_d, HEAD_DIM)  # (BN, BD)
            # -- recompute the probabilities P = exp2(s - lse)
            s = tl.dot(q, tl.trans(k), input_precision=DOT) * qk_scale  # (BM, BN)
            p = tl.math.exp2(s - lse[:, None])  # (BM, BN)
            if MASKED:
                p = tl.where(_visible(offs_m, offs_n, Lk, Lk - Lq, CAUSAL), p, 0.0)
            # -- softmax backward: dS = P * (dP - rowsum(dO * O))
            dp = tl.dot(do, tl.trans(v), input_precision=DOT)  # (BM, BN) dL/dP
            ds = p * (dp - delta[:, None])  # (BM, BN)
            # -- update dq
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT)
    _put_rows(DQ + rows, offs_m, Lq, n_heads * HEAD_DIM, offs_d, dq * sm_scale, HEAD_DIM)


@_autotune((16, 32), [(64, 128, 8, 3), (64, 64, 8, 3), (32, 64, 8, 3), (64, 64, 4, 3)])
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, CU_Q, CU_K,  # pointers
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,  # strides: token, head
    n_heads, n_kv_heads, total_q, sm_scale, SEQ_POW2,  # sizes, scale, autotune length key
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,  # D, and D rounded up to 2^k
    CAUSAL: tl.constexpr, DOT: tl.constexpr,  # switch, dot precision
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # from the autotune configs
):
    """Backward, part 2: dv = P^T @ dO and dk = scale * dS^T @ Q for one block of BLOCK_N keys of
    one sample and one K/V head. It loops over the query heads of its GQA group and the query blocks
    that see these keys, summing in registers: no atomics, and the group's heads add up as GQA
    requires."""
    # ---- which keys: a block of one sample, one K/V head
    n_block = tl.program_id(0)
    seg = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start, k_start, Lq, Lk = _segment(CU_Q, CU_K, seg)
    n0 = n_block * BLOCK_N
    if n0 >= Lk:
        return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    K += k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    V += k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    k = _rows(K, offs_n, Lk, stride_kt, offs_d, HEAD_DIM)  # (BN, BD)
    v = _rows(V, offs_n, Lk, stride_vt, offs_d, HEAD_DIM)  # (BN, BD)
    shift = Lk - Lq  # causal: query i sees key j iff j <= i + shift
    group = n_heads // n_kv_heads
    qk_scale = sm_scale * 1.4426950408889634
    # ---- the query blocks that see these keys
    # Query blocks before lo see none of these keys (skipped); [lo, mid) need the causal mask. From
    # mid on, every query sees all the block's keys (query i sees key j iff i >= j - shift).
    lo = 0
    mid = 0
    if CAUSAL:
        lo = tl.maximum(n0 - shift, 0) // BLOCK_M * BLOCK_M
        mid = lo + tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - shift, 0) - lo, BLOCK_M) * BLOCK_M
    # ---- dk and dv, summed over the group's query heads and their query blocks
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for head in range(kv_head * group, kv_head * group + group):
        Qh = Q + q_start.to(tl.int64) * stride_qt + head * stride_qh
        DOh = DO + q_start.to(tl.int64) * n_heads * HEAD_DIM + head * HEAD_DIM  # dO is contiguous
        LSEh = LSE + head * total_q + q_start
        DELTAh = DELTA + head * total_q + q_start
        for MASKED in tl.static_range(2):
            # Query rows past the sample's end load q = 0, dO = 0, lse = +inf: P, dS are exactly 0.
            for m0 in range(lo if MASKED else mid, mid if MASKED else Lq, BLOCK_M):
                # -- load a block of queries, their dO, lse and delta
                offs_m = m0 + tl.arange(0, BLOCK_M)
                q = _rows(Qh, offs_m, Lq, stride_qt, offs_d, HEAD_DIM)  # (BM, BD)
                do = _rows(DOh, offs_m, Lq, n_heads * HEAD_DIM, offs_d, HEAD_DIM)  # (BM, BD)
                lse = tl.load(LSEh + offs_m, mask=offs_m < Lq, other=float("inf"))
                delta = tl.load(DELTAh + offs_m, mask=offs_m < Lq, other=0.0)
                # -- recompute the probabilities, transposed: P^T = exp2(s^T - lse)
                sT = tl.dot(k, tl.trans(q), input_precision=DOT) * qk_scale  # (BN, BM)
                pT = tl.math.exp2(sT - lse[None, :])  # (BN, BM)
                if MASKED:
                    pT = tl.where(offs_n[:, None] <= offs_m[None, :] + shift, pT, 0.0)
                # -- update dv
                dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT)
                # -- softmax backward dS^T = P^T * (dP^T - delta), then update dk
                dpT = tl.dot(v, tl.trans(do), input_precision=DOT)  # (BN, BM)
                dsT = pT * (dpT - delta[None, :])
                dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT)
    # ---- write dk and dv
    # Keys that no query sees (e.g. past every diagonal) still get their zeros written here.
    rows = k_start.to(tl.int64) * n_kv_heads * HEAD_DIM + kv_head * HEAD_DIM  # dK, dV: contiguous
    _put_rows(DK + rows, offs_n, Lk, n_kv_heads * HEAD_DIM, offs_d, dk * sm_scale, HEAD_DIM)
    _put_rows(DV + rows, offs_n, Lk, n_kv_heads * HEAD_DIM, offs_d, dv, HEAD_DIM)


# ==== Launching the kernels

def _empty_like(x):
    """An uninitialised buffer with x's shape, dtype and device, from _empty (the tests' hook)."""
    return _empty(x.shape, dtype=x.dtype, device=x.device)


class _FlashAttention(torch.autograd.Function):
    """Launches the kernels. It saves q, k, v, the output and lse, not the probabilities: the
    backward recomputes those tile by tile. Each kernel's grid: (blocks of the longest sample,
    samples, heads). Launches pass every argument by the kernel's parameter name, except BLOCK_M and
    BLOCK_N, which the autotuner adds from its configs."""

    @staticmethod
    def forward(ctx, q, k, v, causal, cu_q, cu_k, max_q, max_k, scale, tiles):
        total_q, n_heads, D = q.shape
        n_kv_heads = k.shape[1]
        n_samples = len(cu_q) - 1
        # ---- the arguments the three kernels share, by parameter name
        ctx.strides = dict(
            stride_qt=q.stride(0), stride_qh=q.stride(1),
            stride_kt=k.stride(0), stride_kh=k.stride(1),
            stride_vt=v.stride(0), stride_vh=v.stride(1),
        )
        # SEQ_POW2, the longest sample rounded up to 2^k, is only a key of the autotuner's cache.
        seq_pow2 = max(16, triton.next_power_of_2(max(max_q, max_k)))
        ctx.sizes = dict(n_heads=n_heads, n_kv_heads=n_kv_heads, total_q=total_q, sm_scale=scale,
                         SEQ_POW2=seq_pow2)
        ctx.meta = dict(  # constexprs; BLOCK_M and BLOCK_N come from the autotuner
            HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), CAUSAL=causal,
            DOT="tf32x3" if q.dtype == torch.float32 else "tf32",  # fp32: ~fp32-exact 3xTF32 dots
        )
        ctx.cu_q = cu_q
        ctx.cu_k = cu_k
        ctx.n_samples = n_samples
        ctx.max_q = max_q
        ctx.max_k = max_k

        # ---- the forward kernel
        def grid(meta):
            """One program per (query block of the longest sample, sample, head)."""
            return (max(1, triton.cdiv(max_q, meta["BLOCK_M"])), n_samples, n_heads)

        o = _empty((total_q, n_heads, D), dtype=q.dtype, device=q.device)
        lse = _empty((n_heads, total_q), dtype=torch.float32, device=q.device)  # log2 units
        # The tile counter is a test hook (COUNT); without one, lse fills the unused pointer slot.
        counter = lse if tiles is None else tiles
        _fwd_kernel[grid](
            Q=q, K=k, V=v, O=o, LSE=lse, CU_Q=cu_q, CU_K=cu_k, TILES=counter,
            **ctx.strides,
            **ctx.sizes,
            COUNT=tiles is not None, **ctx.meta,
        )
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        n_heads = q.shape[1]
        n_kv_heads = k.shape[1]
        # Autograd may hand over an expanded (stride 0) or transposed gradient.
        do = do.contiguous()
        dq = _empty_like(q)
        dk = _empty_like(k)
        dv = _empty_like(v)
        delta = _empty_like(lse)  # rowsum(dO * O), (n_heads, total_q)

        def dq_grid(meta):
            """One program per (query block of the longest sample, sample, head), as the forward."""
            return (max(1, triton.cdiv(ctx.max_q, meta["BLOCK_M"])), ctx.n_samples, n_heads)

        def dkdv_grid(meta):
            """One program per (key block of the longest sample, sample, K/V head)."""
            return (max(1, triton.cdiv(ctx.max_k, meta["BLOCK_N"])), ctx.n_samples, n_kv_heads)

        # dq first: it also writes delta, which the dk, dv kernel reads.
        _bwd_dq_kernel[dq_grid](
            Q=q, K=k, V=v, O=o, DO=do, DQ=dq, LSE=lse, DELTA=delta, CU_Q=ctx.cu_q, CU_K=ctx.cu_k,
            **ctx.strides,
            **ctx.sizes,
            **ctx.meta,
        )
        _bwd_dkdv_kernel[dkdv_grid](
            Q=q, K=k, V=v, DO=do, DK=dk, DV=dv, LSE=lse, DELTA=delta, CU_Q=ctx.cu_q, CU_K=ctx.cu_k,
            **ctx.strides,
            **ctx.sizes,
            **ctx.meta,
        )
        # No gradient for causal, cu_q, cu_k, max_q, max_k, scale, tiles.
        return dq, dk, dv, None, None, None, None, None, None, None


def _check_cu(name, cu, total, device):
    """Validate one cu_seqlens tensor; returns the length of its longest sample."""
    is_offsets = isinstance(cu, torch.Tensor) and cu.dtype == torch.int32 and cu.dim() == 1
    if not is_offsets or cu.numel() < 2:
        raise ValueError(f"{name} must be a 1-D int32 tensor [0, ..., total], got {cu!r:.80}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    vals = cu.tolist()  # one host sync: the grid size needs the longest sample anyway
    if vals[0] != 0 or any(b < a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"{name} must start at 0 and be non-decreasing, got {vals[:8]}...")
    if vals[-1] != total:
        raise ValueError(f"{name} must end at the total length {total}, but ends at {vals[-1]}")
    return max(b - a for a, b in zip(vals, vals[1:]))


def attention(q, k, v, causal=False, cu_seqlens_q=None, cu_seqlens_k=None, scale=None, *,
              _tiles=None):
    """softmax(q k^T * scale [+ mask]) v, per sample and per head. q: (total_q, n_heads, D),
    k, v: (total_k, n_kv_heads, D) with n_heads a multiple of n_kv_heads (GQA), D <= 256.
    cu_seqlens_q/k: int32 (n_samples + 1,) offsets of the packed samples; None means one sample.
    causal: query i of a sample sees key j iff j <= i + (Lk - Lq) (bottom-right aligned, as in
    prefill after cached tokens); a query that sees no key gets zeros.
    Returns (total_q, n_heads, D). _tiles: an int32 counter of the tiles computed (tests only)."""
    # ---- check the inputs
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or q.shape[2] != k.shape[2]:
        raise ValueError(f"expected q (total_q, n_heads, D), k and v (total_k, n_kv_heads, D), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    if q.dtype not in dtypes or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype among fp32/fp16/bf16, got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError("on CPU the kernels need TRITON_INTERPRET=1 set before triton is imported")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"n_heads ({q.shape[1]}) must be a multiple of n_kv_heads ({k.shape[1]})")
    if q.shape[2] > 256:
        raise ValueError(f"head dim {q.shape[2]} > 256 is not supported")
    # ---- the samples: their offsets and the longest one
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("give both cu_seqlens_q and cu_seqlens_k, or neither")
    if cu_seqlens_q is None:
        # One sample: [0, n], made on the device (a tensor from a list would wait for the GPU).
        max_q = q.shape[0]
        max_k = k.shape[0]
        cu_seqlens_q = torch.arange(2, dtype=torch.int32, device=q.device) * max_q
        cu_seqlens_k = torch.arange(2, dtype=torch.int32, device=q.device) * max_k
    else:
        max_q = _check_cu("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
        max_k = _check_cu("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k have {len(cu_seqlens_q)} and "
                             f"{len(cu_seqlens_k)} entries")
    # ---- run
    # The kernels need stride 1 in D; other strides are passed as they are.
    q, k, v = [x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v)]
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    return _FlashAttention.apply(q, k, v, causal, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale,
                                 _tiles)


# ==== The oracle, the self-check and the benchmark (`python kernels.py`)

def _plain(q, k, v, causal=False, cu_q=None, cu_k=None, scale=None):
    """Plain PyTorch attention, one sample at a time: the self-check's oracle and a baseline."""
    cu_q = [0, len(q)] if cu_q is None else cu_q.tolist()
    cu_k = [0, len(k)] if cu_k is None else cu_k.tolist()
    scale = q.shape[2] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    out = []
    for q0, q1, k0, k1 in zip(cu_q, cu_q[1:], cu_k, cu_k[1:]):
        kk = k[k0:k1].repeat_interleave(group, 1)  # (Lk, H, D)
        vv = v[k0:k1].repeat_interleave(group, 1)  # (Lk, H, D)
        s = torch.einsum("qhd,khd->hqk", q[q0:q1], kk) * scale  # (H, Lq, Lk)
        see = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=q.device)
        if causal:
            see = see.tril(k1 - k0 - (q1 - q0))  # bottom-right aligned diagonal
        # A blind row (one that sees no key) gets zeros, not NaN; a float64 oracle stays float64.
        softmax_dtype = torch.promote_types(s.dtype, torch.float32)
        p = s.masked_fill(~see, float("-inf")).softmax(-1, dtype=softmax_dtype).nan_to_num(0.0)
        out.append(torch.einsum("hqk,khd->qhd", p.to(vv.dtype), vv))
    return torch.cat(out)


def _self_check(device):
    """Forward and gradients against float64 plain attention on small packed/causal/GQA cases."""
    # lengths of the q samples, of the k samples, heads, K/V heads, D, causal, dtype, tolerance
    cases = [
        ([37], [37], 4, 4, 64, True, torch.float32, 1e-5),
        ([5, 1, 40], [5, 1, 40], 6, 2, 72, False, torch.bfloat16, 1e-2),
        ([3, 20], [30, 20], 7, 1, 128, True, torch.float16, 1e-3),
    ]
    for lq, lk, h, h_kv, d, causal, dtype, tol in cases:
        cu_q = torch.tensor([0] + lq, device=device).cumsum(0).int()
        cu_k = torch.tensor([0] + lk, device=device).cumsum(0).int()
        q = torch.randn(sum(lq), h, d, device=device, dtype=dtype)
        k = torch.randn(sum(lk), h_kv, d, device=device, dtype=dtype)
        v = torch.randn(sum(lk), h_kv, d, device=device, dtype=dtype)
        grad = torch.randn(sum(lq), h, d, device=device, dtype=dtype)
        # The kernel, then the reference in float64, each on its own leaf copies of q, k, v.
        runs = [
            (attention, [t.clone().requires_grad_() for t in (q, k, v)]),
            (_plain, [t.double().requires_grad_() for t in (q, k, v)]),
        ]
        outs = []  # per run: [out, dq, dk, dv]
        for fn, x in runs:
            out = fn(*x, causal, cu_q, cu_k)
            out.backward(grad.to(out.dtype))
            outs.append([out.detach()] + [t.grad for t in x])
        errs = [((a.double() - b).norm() / b.norm()).item() for a, b in zip(*outs)]
        print(f"self-check {str(dtype)[6:]:8} D={d:3} causal={causal!s:5} rel. err out/dq/dk/dv: "
              + " ".join(f"{e:.1e}" for e in errs))
        if not all(e <= tol for e in errs):  # NaN fails too
            raise SystemExit(f"self-check FAILED: error above {tol}")


def _benchmark():
    """TFLOP/s of this kernel, SDPA (PyTorch's best backend) and the plain path, bf16, forward
    and fwd+bwd."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    def tflops(fn, flop, grads):
        """Median TFLOP/s of fn(), or None (printed as "-") when it runs out of GPU memory."""
        try:
            ms = triton.testing.do_bench(fn, grad_to_none=grads, return_mode="median")
            return flop / ms / 1e9
        except torch.cuda.OutOfMemoryError:
            return None

    def columns(rates):
        """One half of a table row: triton, sdpa, plain ("-" where missing), then triton/sdpa."""
        cells = "".join(f"{t:7.1f}" if t else "      -" for t in rates[:3])
        if rates[0] and rates[1]:
            return cells + f"{rates[0] / rates[1]:12.2f}x"
        return cells + "            -"

    # (name, sample lengths, heads, D, causal): the model's cases first
    cases = [(f"vision {n:2}x729 H=16 D=72", [729] * n, 16, 72, False) for n in (8, 32)]
    packed = [1000, 3000, 500, 2000, 4096, 300, 1500, 3988]
    cases += [("packed 8 samples, 16k H=32 D=128", packed, 32, 128, True)]
    cases += [(f"prefill T={t:5} H={h} D={d}", [t], h, d, True)
              for d in (64, 128) for h in (16, 32) for t in (1024, 2048, 4096, 8192, 16384)]
    print(f"\nbf16 on {torch.cuda.get_device_name()}, TFLOP/s (fwd+bwd counted as 3.5x the "
          "forward's FLOPs); SDPA gets (batch, heads, T, D) zero-padded to the longest sample\n"
          f"{'case':34} | fwd: triton   sdpa  plain  triton/sdpa "
          "| fwd+bwd: triton   sdpa  plain  triton/sdpa")
    bf16 = dict(device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for name, lens, h, d, causal in cases:
        # Several samples go in packed, as the model sends them.
        cu = None if len(lens) == 1 else torch.tensor([0] + lens, device="cuda").cumsum(0).int()
        x = [torch.randn(sum(lens), h, d, **bf16) for _ in range(3)]  # q, k, v: (T, H, D)
        xp = [torch.randn(len(lens), h, max(lens), d, **bf16) for _ in range(3)]  # (B, H, T, D)
        runs = [
            (lambda: attention(*x, causal, cu, cu), x),
            (lambda: sdpa(*xp, is_causal=causal), xp),
        ]
        if h * sum(n * n for n in lens) <= 2 ** 28:  # the plain path materialises (H, T, T) scores
            runs.append((lambda: _plain(*x, causal, cu, cu), x))
        flop = 4 * d * h * sum(n * (n + 1) // 2 if causal else n * n for n in lens)
        # A None stands in for the plain path where it is skipped.
        fwd = [tflops(f, flop, None) for f, _ in runs] + [None]
        grads = [torch.randn_like(t[0]) for _, t in runs]
        both = [tflops(lambda f=f, g=g: f().backward(g), 3.5 * flop, t)
                for (f, t), g in zip(runs, grads)] + [None]
        print(f"{name:34} | {columns(fwd):>35} | {columns(both):>38}", flush=True)


if __name__ == "__main__":
    _self_check("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        _benchmark()
    else:
        print("self-check passed in Triton's interpreter; "
              "the TFLOP/s table needs a GPU (no CUDA device here).")
