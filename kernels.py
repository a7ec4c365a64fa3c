"""kernels.py: one hand-written Triton flash-attention kernel family, forward and backward.

Every attention of the model goes through `attention(q, k, v, ...)`: the vision tower (bidirectional), the decoder
(causal, also with fewer queries than cached keys), packed variable-length batches (`cu_seqlens`) and grouped-query
attention (GQA: several query heads share one K/V head).

FlashAttention-2: never build the (queries x keys) score matrix. A program owns a block of queries, walks over blocks
of keys and keeps a running ("online") softmax in fp32: the row maximum m, the denominator l and the un-normalised
output acc. When a key block raises the maximum, the old l and acc are rescaled by exp(m_old - m_new); after the last
block, out = acc / l. The forward also keeps lse = m + log(l) per query, so the backward recomputes the probabilities
p = exp(s - lse) tile by tile instead of storing them.

Layout: q (total_q, n_heads, D), k and v (total_k, n_kv_heads, D), samples packed one after another; cu_seqlens_q/k
(int32, [0, ..., total]) say where each starts. The kernels take the strides of q, k, v, so views (slices of a fused
qkv tensor) are not copied while D is contiguous; outputs and gradients are contiguous. Without CUDA, this module
sets TRITON_INTERPRET=1 before importing Triton: the same kernels then run (slowly) in Triton's numpy interpreter,
which is how the CPU tests check them.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton.jit decorates anything
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
_empty = torch.empty  # every output buffer comes from here; the tests swap in a NaN-filled allocator

if INTERPRET:
    # Triton's numpy interpreter has no bfloat16: it keeps bf16 as raw uint16 bits, its tl.dot multiplies
    # those bits as integers, and its fp32 -> bf16 cast truncates. Fix both (CPU only), so that the kernels,
    # unchanged, round to bf16 where and as a GPU does (round to nearest even; exact bf16 products).
    import numpy as np
    from triton.runtime import interpreter as _interp

    def _convert_float(x, src, dst, rounding, _convert=_interp._convert_float):
        if src == tl.float32 and dst == tl.bfloat16:
            return torch.from_numpy(np.asarray(x, np.float32)).bfloat16().view(torch.int16).numpy().view(np.uint16)
        return _convert(x, src, dst, rounding)

    def _create_dot(self, a, b, *rest, _dot=_interp.InterpreterBuilder.create_dot):
        a, b = [self.cast_impl(x, tl.float32) if x.dtype == tl.bfloat16 else x for x in (a, b)]
        return _dot(self, a, b, *rest)

    _interp._convert_float, _interp.InterpreterBuilder.create_dot = _convert_float, _create_dot


def _autotune(interpret_blocks, gpu_choices):
    """Pick (BLOCK_M, BLOCK_N) and launch settings: one small fixed choice in the interpreter; on a GPU a few that
    the autotuner times once per (head dim, causal, dtypes, length rounded up to 2^k) and then reuses. The last,
    small one fits in shared memory in every case (fp32 with D = 256 too); the others are faster."""
    if INTERPRET:
        configs = [triton.Config(dict(zip(("BLOCK_M", "BLOCK_N"), interpret_blocks)), num_warps=4, num_stages=1)]
    else:
        configs = [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s)
                   for m, n, w, s in gpu_choices + [(32, 32, 4, 1)]]
    return triton.autotune(configs, key=["HEAD_DIM", "CAUSAL", "SEQ_POW2"])


@triton.jit
def _segment(CU_Q, CU_K, seg):
    """Where sample `seg` starts and how long it is, in queries and in keys."""
    q_start, k_start = tl.load(CU_Q + seg), tl.load(CU_K + seg)
    return q_start, k_start, tl.load(CU_Q + seg + 1) - q_start, tl.load(CU_K + seg + 1) - k_start


@triton.jit
def _rows(P, offs, n, stride, offs_d, HEAD_DIM: tl.constexpr):
    """Load rows `offs` of a (n, HEAD_DIM) matrix as a (len(offs), BLOCK_D) tile. Rows >= n (past the
    sample's end) and columns >= HEAD_DIM (D rounded up to a power of two) read 0: they add 0 to dots."""
    return tl.load(P + offs[:, None] * stride + offs_d[None, :],
                   mask=(offs[:, None] < n) & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _put_rows(P, offs, n, stride, offs_d, x, HEAD_DIM: tl.constexpr):
    """Store the valid part of a tile written by _rows' rules, in P's dtype."""
    tl.store(P + offs[:, None] * stride + offs_d[None, :], x.to(P.dtype.element_ty),
             mask=(offs[:, None] < n) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _visible(offs_m, offs_n, Lk, shift, CAUSAL: tl.constexpr):
    """(BM, BN) mask of the keys a query may see: inside the sample and, if causal, j <= i + shift."""
    see = offs_n[None, :] < Lk
    if CAUSAL:
        see = see & (offs_n[None, :] <= offs_m[:, None] + shift)
    return see


@triton.jit
def _key_range(m0, Lq, Lk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Key blocks the query block [m0, m0 + BLOCK_M) of one sample visits: [0, full) need no mask,
    [full, end) need one. Keys of other samples are never visited: the loops only run inside this one.
    Causal: query i sees key j iff j <= i + (Lk - Lq), the diagonal aligned to the bottom-right corner,
    so cached keys (Lk > Lq) are all visible. Key blocks past the diagonal of the block's last row are
    skipped entirely; this is what halves the work of causal attention."""
    full, end = Lk, Lk
    if CAUSAL:
        end = tl.minimum(Lk, m0 + BLOCK_M + Lk - Lq)  # one past the last key the last row sees
        full = tl.minimum(Lk, m0 + 1 + Lk - Lq)  # keys the first row (so every row) sees
    return tl.maximum(full, 0) // BLOCK_N * BLOCK_N, end  # a partly visible block goes to the masked loop


@_autotune((32, 16), [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 8, 3)])
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                n_heads, n_kv_heads, total_q, sm_scale, SEQ_POW2, tiles, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DOT: tl.constexpr, COUNT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Forward. One program = one block of BLOCK_M queries of one sample, for one head."""
    # Last query blocks first: causal ones see the most keys, and the heaviest work should not start last.
    m_block, seg, head = tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start, k_start, Lq, Lk = _segment(CU_Q, CU_K, seg)
    m0 = m_block * BLOCK_M
    if m0 >= Lq:  # the grid is sized for the longest sample; shorter ones end here
        return
    kv_head = head // (n_heads // n_kv_heads)  # GQA: a group of query heads reads one K/V head, uncopied
    qk_scale = sm_scale * 1.4426950408889634  # scores in log2 units: exp(x) = exp2(x * log2(e)), exp2 is fast
    offs_m, offs_d = m0 + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D)  # BLOCK_D: D rounded up to 2^k
    q = _rows(Q + q_start.to(tl.int64) * stride_qt + head * stride_qh, offs_m, Lq, stride_qt, offs_d, HEAD_DIM)
    K += k_start.to(tl.int64) * stride_kt + kv_head * stride_kh  # this sample's keys, this K/V head
    V += k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running row maximum
    l_i = tl.zeros((BLOCK_M,), tl.float32)  # running denominator
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)  # running numerator
    full, end = _key_range(m0, Lq, Lk, BLOCK_M, BLOCK_N, CAUSAL)
    for MASKED in tl.static_range(2):  # the same loop twice: blocks [0, full) unmasked, [full, end) masked
        for n0 in range(full if MASKED else 0, end if MASKED else full, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k = _rows(K, offs_n, Lk, stride_kt, offs_d, HEAD_DIM)  # (BN, BD)
            v = _rows(V, offs_n, Lk, stride_vt, offs_d, HEAD_DIM)  # (BN, BD)
            s = tl.dot(q, tl.trans(k), input_precision=DOT) * qk_scale  # (BM, BN) scores, in log2 units
            if MASKED:  # only the blocks on the diagonal or at the sample's end pay for the mask
                s = tl.where(_visible(offs_m, offs_n, Lk, Lk - Lq, CAUSAL), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no key yet has m = -inf; subtracting 0 instead keeps exp2(-inf) = 0, not NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])  # (BM, BN) un-normalised probabilities
            alpha = tl.math.exp2(m_i - m_safe)  # how much the old running sums shrink under the new maximum
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT)
            m_i = m_new
            if COUNT:  # test hook: count the (query block, key block) tiles really computed
                tl.atomic_add(tiles, 1)
    # A query that sees no key (causal with Lq > Lk: the first Lq - Lk rows) has l = 0: it outputs zeros,
    # and lse = +inf makes its recomputed probabilities exactly 0 in the backward.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    O += q_start.to(tl.int64) * n_heads * HEAD_DIM + head * HEAD_DIM  # O is contiguous (total_q, H, D)
    _put_rows(O, offs_m, Lq, n_heads * HEAD_DIM, offs_d, acc / l_safe[:, None], HEAD_DIM)
    lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.math.log2(l_safe))  # log2 of the softmax denominator
    tl.store(LSE + head * total_q + q_start + offs_m, lse, mask=offs_m < Lq)


@_autotune((32, 16), [(128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 8, 3), (64, 64, 4, 3)])
@triton.jit
def _bwd_dq_kernel(Q, K, V, O, DO, DQ, LSE, DELTA, CU_Q, CU_K, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_vt, stride_vh, n_heads, n_kv_heads, total_q, sm_scale, SEQ_POW2,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DOT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Backward, part 1: dq = scale * dS @ K for one block of queries, over the forward's key blocks,
    recomputing P = exp2(s - lse). It also writes delta = rowsum(dO * O), which part 2 reads."""
    m_block, seg, head = tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start, k_start, Lq, Lk = _segment(CU_Q, CU_K, seg)
    m0 = m_block * BLOCK_M
    if m0 >= Lq:
        return
    kv_head, qk_scale = head // (n_heads // n_kv_heads), sm_scale * 1.4426950408889634
    offs_m, offs_d = m0 + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D)
    q = _rows(Q + q_start.to(tl.int64) * stride_qt + head * stride_qh, offs_m, Lq, stride_qt, offs_d, HEAD_DIM)
    rows = q_start.to(tl.int64) * n_heads * HEAD_DIM + head * HEAD_DIM  # O, dO and dQ are contiguous
    do = _rows(DO + rows, offs_m, Lq, n_heads * HEAD_DIM, offs_d, HEAD_DIM)  # (BM, BD)
    o = _rows(O + rows, offs_m, Lq, n_heads * HEAD_DIM, offs_d, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BM,)
    tl.store(DELTA + head * total_q + q_start + offs_m, delta, mask=offs_m < Lq)
    lse = tl.load(LSE + head * total_q + q_start + offs_m, mask=offs_m < Lq, other=float("inf"))
    K += k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    V += k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    full, end = _key_range(m0, Lq, Lk, BLOCK_M, BLOCK_N, CAUSAL)
    for MASKED in tl.static_range(2):
        for n0 in range(full if MASKED else 0, end if MASKED else full, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k = _rows(K, offs_n, Lk, stride_kt, offs_d, HEAD_DIM)  # (BN, BD)
            v = _rows(V, offs_n, Lk, stride_vt, offs_d, HEAD_DIM)  # (BN, BD)
            p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=DOT) * qk_scale - lse[:, None])  # (BM, BN)
            if MASKED:
                p = tl.where(_visible(offs_m, offs_n, Lk, Lk - Lq, CAUSAL), p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT)  # (BM, BN) dL/dP
            ds = p * (dp - delta[:, None])  # softmax backward: dS = P * (dP - rowsum(dO * O))
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT)
    _put_rows(DQ + rows, offs_m, Lq, n_heads * HEAD_DIM, offs_d, dq * sm_scale, HEAD_DIM)


@_autotune((16, 32), [(64, 128, 8, 3), (64, 64, 8, 3), (32, 64, 8, 3), (64, 64, 4, 3)])
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, CU_Q, CU_K, stride_qt, stride_qh, stride_kt, stride_kh,
                     stride_vt, stride_vh, n_heads, n_kv_heads, total_q, sm_scale, SEQ_POW2,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DOT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Backward, part 2: dv = P^T @ dO and dk = scale * dS^T @ Q for one block of BLOCK_N keys of one
    sample and one K/V head. It loops over the query heads of its GQA group and the query blocks that see
    these keys, summing in registers: no atomics, and the group's heads add up as GQA requires."""
    n_block, seg, kv_head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start, k_start, Lq, Lk = _segment(CU_Q, CU_K, seg)
    n0 = n_block * BLOCK_N
    if n0 >= Lk:
        return
    offs_n, offs_d = n0 + tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    k = _rows(K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh, offs_n, Lk, stride_kt, offs_d, HEAD_DIM)
    v = _rows(V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh, offs_n, Lk, stride_vt, offs_d, HEAD_DIM)
    shift, group, qk_scale = Lk - Lq, n_heads // n_kv_heads, sm_scale * 1.4426950408889634
    lo, mid = 0, 0  # query blocks before lo see none of these keys (skipped); [lo, mid) need the causal mask
    if CAUSAL:  # query i sees key j iff i >= j - shift; from mid on every query sees all the block's keys
        lo = tl.maximum(n0 - shift, 0) // BLOCK_M * BLOCK_M
        mid = lo + tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - shift, 0) - lo, BLOCK_M) * BLOCK_M
    dk, dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32), tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for head in range(kv_head * group, kv_head * group + group):
        Qh = Q + q_start.to(tl.int64) * stride_qt + head * stride_qh
        DOh = DO + q_start.to(tl.int64) * n_heads * HEAD_DIM + head * HEAD_DIM  # dO is contiguous
        LSEh, DELTAh = LSE + head * total_q + q_start, DELTA + head * total_q + q_start
        for MASKED in tl.static_range(2):
            # Query rows past the sample's end load q = 0, dO = 0 and lse = +inf: their P and dS are exactly 0.
            for m0 in range(lo if MASKED else mid, mid if MASKED else Lq, BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                q = _rows(Qh, offs_m, Lq, stride_qt, offs_d, HEAD_DIM)  # (BM, BD)
                do = _rows(DOh, offs_m, Lq, n_heads * HEAD_DIM, offs_d, HEAD_DIM)  # (BM, BD)
                lse = tl.load(LSEh + offs_m, mask=offs_m < Lq, other=float("inf"))
                delta = tl.load(DELTAh + offs_m, mask=offs_m < Lq, other=0.0)
                pT = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=DOT) * qk_scale - lse[None, :])  # (BN, BM)
                if MASKED:
                    pT = tl.where(offs_n[:, None] <= offs_m[None, :] + shift, pT, 0.0)
                dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT)
                dpT = tl.dot(v, tl.trans(do), input_precision=DOT)  # (BN, BM)
                dsT = pT * (dpT - delta[None, :])
                dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT)
    # Keys that no query sees (e.g. past every diagonal) still get their zeros written here.
    rows = k_start.to(tl.int64) * n_kv_heads * HEAD_DIM + kv_head * HEAD_DIM  # dK, dV are contiguous
    _put_rows(DK + rows, offs_n, Lk, n_kv_heads * HEAD_DIM, offs_d, dk * sm_scale, HEAD_DIM)
    _put_rows(DV + rows, offs_n, Lk, n_kv_heads * HEAD_DIM, offs_d, dv, HEAD_DIM)


class _FlashAttention(torch.autograd.Function):
    """Launches the kernels. It saves q, k, v, the output and lse, not the probabilities: the backward
    recomputes those tile by tile. Each kernel's grid: (blocks of the longest sample, samples, heads)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, cu_q, cu_k, max_q, max_k, scale, tiles):
        (total_q, n_heads, D), n_kv = q.shape, k.shape[1]
        ctx.shared = (cu_q, cu_k, *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], n_heads, n_kv, total_q, scale,
                      max(16, triton.next_power_of_2(max(max_q, max_k))))  # rounded length: autotuning key only
        ctx.meta = dict(HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), CAUSAL=causal,
                        DOT="tf32x3" if q.dtype == torch.float32 else "tf32")  # fp32: ~fp32-exact 3xTF32 dots
        ctx.grid = lambda n, block, heads: lambda cfg: (max(1, triton.cdiv(n, cfg[block])), len(cu_q) - 1, heads)
        ctx.max_q, ctx.max_k = max_q, max_k
        o = _empty((total_q, n_heads, D), dtype=q.dtype, device=q.device)
        lse = _empty((n_heads, total_q), dtype=torch.float32, device=q.device)  # log2 of softmax denominators
        _fwd_kernel[ctx.grid(max_q, "BLOCK_M", n_heads)](q, k, v, o, lse, *ctx.shared, lse if tiles is None
                                                         else tiles, COUNT=tiles is not None, **ctx.meta)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        do = do.contiguous()  # autograd may hand over an expanded (stride 0) or transposed gradient
        like = lambda x: _empty(x.shape, dtype=x.dtype, device=x.device)  # noqa: E731
        dq, dk, dv, delta = like(q), like(k), like(v), like(lse)  # delta: rowsum(dO * O), (n_heads, total_q)
        _bwd_dq_kernel[ctx.grid(ctx.max_q, "BLOCK_M", q.shape[1])](q, k, v, o, do, dq, lse, delta, *ctx.shared,
                                                                   **ctx.meta)  # first: it also writes delta
        _bwd_dkdv_kernel[ctx.grid(ctx.max_k, "BLOCK_N", k.shape[1])](q, k, v, do, dk, dv, lse, delta, *ctx.shared,
                                                                     **ctx.meta)
        return dq, dk, dv, None, None, None, None, None, None, None


def _check_cu(name, cu, total, device):
    """Validate one cu_seqlens tensor; returns the length of its longest sample."""
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be a 1-D int32 tensor [0, ..., total], got {cu!r:.80}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    vals = cu.tolist()  # one host sync: the grid size needs the longest sample anyway
    if vals[0] != 0 or any(b < a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"{name} must start at 0 and be non-decreasing, got {vals[:8]}...")
    if vals[-1] != total:
        raise ValueError(f"{name} must end at the total length {total}, but ends at {vals[-1]}")
    return max(b - a for a, b in zip(vals, vals[1:]))


def attention(q, k, v, causal=False, cu_seqlens_q=None, cu_seqlens_k=None, scale=None, *, _tiles=None):
    """softmax(q k^T * scale [+ mask]) v, per sample and per head. q: (total_q, n_heads, D),
    k, v: (total_k, n_kv_heads, D) with n_heads a multiple of n_kv_heads (GQA), D <= 256.
    cu_seqlens_q/k: int32 (n_samples + 1,) offsets of the packed samples; None means one sample.
    causal: query i of a sample sees key j iff j <= i + (Lk - Lq) (bottom-right aligned, as in
    prefill after cached tokens); a query that sees no key gets zeros. Returns (total_q, n_heads, D)."""
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or q.shape[2] != k.shape[2]:
        raise ValueError(f"expected q (total_q, n_heads, D), k and v (total_k, n_kv_heads, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype among fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError("on CPU the kernels need TRITON_INTERPRET=1 set before triton is imported")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"n_heads ({q.shape[1]}) must be a multiple of n_kv_heads ({k.shape[1]})")
    if q.shape[2] > 256:
        raise ValueError(f"head dim {q.shape[2]} > 256 is not supported")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("give both cu_seqlens_q and cu_seqlens_k, or neither")
    if cu_seqlens_q is None:  # one sample: [0, n] made on the device (a tensor from a list would wait for the GPU)
        max_q, max_k = q.shape[0], k.shape[0]
        cu_seqlens_q, cu_seqlens_k = [torch.arange(2, dtype=torch.int32, device=q.device) * n for n in (max_q, max_k)]
    else:
        max_q = _check_cu("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
        max_k = _check_cu("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k have {len(cu_seqlens_q)} and {len(cu_seqlens_k)} entries")
    q, k, v = [x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v)]  # the kernels need stride 1 in D
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    return _FlashAttention.apply(q, k, v, causal, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale, _tiles)


def _plain(q, k, v, causal=False, cu_q=None, cu_k=None, scale=None):
    """Plain PyTorch attention, one sample at a time: the self-check's reference and a benchmark baseline."""
    cu_q, cu_k = [[0, len(x)] if cu is None else cu.tolist() for x, cu in ((q, cu_q), (k, cu_k))]
    scale, group, out = q.shape[2] ** -0.5 if scale is None else scale, q.shape[1] // k.shape[1], []
    for q0, q1, k0, k1 in zip(cu_q, cu_q[1:], cu_k, cu_k[1:]):
        kk, vv = k[k0:k1].repeat_interleave(group, 1), v[k0:k1].repeat_interleave(group, 1)  # (Lk, H, D)
        s = torch.einsum("qhd,khd->hqk", q[q0:q1], kk) * scale  # (H, Lq, Lk)
        see = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=q.device)
        see = see.tril(k1 - k0 - (q1 - q0)) if causal else see  # bottom-right aligned diagonal
        p = s.masked_fill(~see, float("-inf")).softmax(-1, dtype=torch.float32).nan_to_num(0.0)  # blind rows: 0
        out.append(torch.einsum("hqk,khd->qhd", p.to(vv.dtype), vv))
    return torch.cat(out)


def _self_check(device):
    """Forward and gradients against float64 plain attention, on small random packed/causal/GQA cases."""
    for lq, lk, h, h_kv, d, causal, dtype, tol in [([37], [37], 4, 4, 64, True, torch.float32, 1e-5),
                                                    ([5, 1, 40], [5, 1, 40], 6, 2, 72, False, torch.bfloat16, 1e-2),
                                                    ([3, 20], [30, 20], 7, 1, 128, True, torch.float16, 1e-3)]:
        cu_q, cu_k = [torch.tensor([0] + n, device=device).cumsum(0).int() for n in (lq, lk)]
        qkv = [torch.randn(sum(n), m, d, device=device, dtype=dtype) for n, m in ((lq, h), (lk, h_kv), (lk, h_kv))]
        grad, outs = torch.randn(sum(lq), h, d, device=device, dtype=dtype), []
        for fn, x in ((attention, [t.clone().requires_grad_() for t in qkv]),
                      (_plain, [t.double().requires_grad_() for t in qkv])):  # the reference runs in float64
            out = fn(*x, causal, cu_q, cu_k)
            out.backward(grad.to(out.dtype))
            outs.append([out.detach()] + [t.grad for t in x])
        errs = [((a.double() - b).norm() / b.norm()).item() for a, b in zip(*outs)]
        print(f"self-check {str(dtype)[6:]:8} D={d:3} causal={causal!s:5} rel. err out/dq/dk/dv: "
              + " ".join(f"{e:.1e}" for e in errs))
        if not all(e <= tol for e in errs):  # NaN fails too
            raise SystemExit(f"self-check FAILED: error above {tol}")


def _benchmark():
    """TFLOP/s of this kernel, SDPA (PyTorch's best backend) and the plain path, bf16, forward and fwd+bwd."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    def tflops(fn, flop, grads):
        try:
            return flop / triton.testing.do_bench(fn, grad_to_none=grads, return_mode="median") / 1e9
        except torch.cuda.OutOfMemoryError:  # printed as "-"
            return None

    cases = [(f"vision {n:2}x729 H=16 D=72", [729] * n, 16, 72, False) for n in (8, 32)]  # the model's cases first
    cases += [("packed 8 samples, 16k H=32 D=128", [1000, 3000, 500, 2000, 4096, 300, 1500, 3988], 32, 128, True)]
    cases += [(f"prefill T={t:5} H={h} D={d}", [t], h, d, True)
              for d in (64, 128) for h in (16, 32) for t in (1024, 2048, 4096, 8192, 16384)]
    print(f"\nbf16 on {torch.cuda.get_device_name()}, TFLOP/s (fwd+bwd counted as 3.5x the forward's FLOPs); SDPA "
          f"gets (batch, heads, T, D) zero-padded to the longest sample\n{'case':34} | fwd: triton   sdpa  plain  "
          "triton/sdpa | fwd+bwd: triton   sdpa  plain  triton/sdpa")
    for name, lens, h, d, causal in cases:
        cu = None if len(lens) == 1 else torch.tensor([0] + lens, device="cuda").cumsum(0).int()  # as the model
        x = [torch.randn(sum(lens), h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
        xp = [torch.randn(len(lens), h, max(lens), d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
              for _ in range(3)]  # (B, H, T, D)
        runs = [(lambda: attention(*x, causal, cu, cu), x), (lambda: sdpa(*xp, is_causal=causal), xp)]
        if h * sum(n * n for n in lens) <= 2 ** 28:  # the plain path materialises (H, T, T) scores
            runs.append((lambda: _plain(*x, causal, cu, cu), x))
        flop = 4 * d * h * sum(n * (n + 1) // 2 if causal else n * n for n in lens)
        fwd = [tflops(f, flop, None) for f, _ in runs] + [None]
        grads = [torch.randn_like(t[0]) for _, t in runs]
        both = [tflops(lambda f=f, g=g: f().backward(g), 3.5 * flop, t) for (f, t), g in zip(runs, grads)] + [None]
        show = lambda r: "".join(f"{t:7.1f}" if t else "      -" for t in r[:3]) + (  # noqa: E731
            f"{r[0] / r[1]:12.2f}x" if r[0] and r[1] else "            -")
        print(f"{name:34} | {show(fwd):>35} | {show(both):>38}", flush=True)


if __name__ == "__main__":
    _self_check("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        _benchmark()
    else:
        print("self-check passed in Triton's interpreter; the TFLOP/s table needs a GPU (no CUDA device here).")
