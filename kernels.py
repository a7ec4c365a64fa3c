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

The other tricks, one sentence each:
- Causal skipping: key blocks past the diagonal of a query block are never visited (half the work).
- No host sync: the wrapper never reads a device tensor. Packed calls either get max_seqlen_q/k
  from the caller (grid: blocks of the longest sample x samples), or launch total // BLOCK +
  n_samples programs per head, each finding its sample by a binary search over cu_seqlens.
- One sample: the lengths go in as scalars (the constexpr switch PACKED off), no offsets tensor.
- Head dims that are not a power of two: D = D_MAIN (a power of two) + a rest tile of 16 or more
  columns, e.g. 72 = 64 + 16 with 8 masked, so every dot does 80 columns of work, not 128.
- Backward in five matmuls (FlashAttention-2): a small kernel computes delta = rowsum(dO * O); then
  one program per key block computes dk, dv and adds its share of dq into an fp32 buffer with
  atomic adds, cast at the end. fp32 additions in a varying order round differently, so dq is not
  bit-reproducible; deterministic=True runs a separate dq kernel instead (seven matmuls).
- Launch: block sizes are tuned once per (head dim, causal, packed, length class) from a search
  space per head dim, and the choice is cached on disk (Triton's autotune cache).

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

KEY = ["HEAD_DIM", "CAUSAL", "PACKED", "SEQ_POW2"]  # what a tuned choice depends on (and dtypes)


def _autotune(interpret_blocks, gpu_choices, key=KEY, reset_to_zero=None):
    """Pick (BLOCK_M, BLOCK_N) and launch settings: one small fixed choice in the interpreter; on a
    GPU the autotuner times the choices listed for the head dim's width once per key and caches the
    winner on disk. gpu_choices: {widest head dim: [(BLOCK_M, BLOCK_N, num_warps, num_stages)]};
    (32, 32, 4, 1) is added to each list: it fits in shared memory in every case (fp32 with D = 256
    too). BLOCK_M and BLOCK_N come from these configs, so a launch must not pass them too."""
    if INTERPRET:
        block_m, block_n = interpret_blocks
        configs = [triton.Config(dict(BLOCK_M=block_m, BLOCK_N=block_n), num_warps=4, num_stages=1)]
        return triton.autotune(configs, key=key)
    choices = {width: listed + [(32, 32, 4, 1)] for width, listed in gpu_choices.items()}

    def for_head_dim(configs, named_args, **kwargs):
        """The configs listed for the narrowest width that holds this head dim's dot columns."""
        width = kwargs["D_MAIN"] + kwargs["D_REST"]
        listed = choices[min(w for w in choices if w >= width)]
        return [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in listed]

    every = sorted({choice for listed in choices.values() for choice in listed})
    configs = [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s)
               for m, n, w, s in every]
    return triton.autotune(configs, key=key, prune_configs_by=dict(early_config_prune=for_head_dim),
                           reset_to_zero=reset_to_zero, cache_results=True)


def _split_head_dim(d):
    """(D_MAIN, D_REST): the column widths of the two tiles every dot is split into, for head dim d.
    D_MAIN is the largest power of two <= d (at least 16, tl.dot's minimum); the rest of d rounds up
    to a power of two >= 16. D_REST is 0 (one tile, d padded to a power of two) when d is one, or
    when the two tiles would not be narrower than the padding: 112 = 64 + 48 -> 64 + 64 = 128."""
    padded = max(16, triton.next_power_of_2(d))
    main = max(16, 1 << (d.bit_length() - 1))
    if d <= main:
        return padded, 0
    rest = max(16, triton.next_power_of_2(d - main))
    if main + rest >= padded:
        return padded, 0
    return main, rest


# ==== Helpers the kernels share

@triton.jit
def _owner(CU, n_samples, pid, BLOCK: tl.constexpr):
    """The sample that owns program pid of a grid with no maximum length, and pid's block in it.
    Sample s owns programs [cu[s] // BLOCK + s, cu[s + 1] // BLOCK + s + 1): at least as many as it
    has blocks, and all of them fit in total // BLOCK + n_samples. A binary search finds the last s
    with cu[s] // BLOCK + s <= pid."""
    lo = 0
    hi = n_samples
    while hi - lo > 1:
        mid = (lo + hi) // 2
        owns = tl.load(CU + mid) // BLOCK + mid <= pid
        lo = tl.where(owns, mid, lo)
        hi = tl.where(owns, hi, mid)
    return lo, pid - (tl.load(CU + lo) // BLOCK + lo)


@triton.jit
def _locate(CU_Q, CU_K, len_q, len_k, n_samples, pid, BLOCK: tl.constexpr, BY_KEYS: tl.constexpr,
            PACKED: tl.constexpr, SEARCH: tl.constexpr):
    """Program pid's block: (its first row in the sample, q_start, k_start, Lq, Lk). One sample
    (not PACKED): the lengths are the scalars len_q, len_k. PACKED: the sample is the grid's second
    axis, or with SEARCH, found in the offsets (of the keys if BY_KEYS, else of the queries)."""
    block = pid
    q_start = tl.zeros((), tl.int32)
    k_start = tl.zeros((), tl.int32)
    Lq = len_q
    Lk = len_k
    if PACKED:
        seg = tl.program_id(1)
        if SEARCH:
            if BY_KEYS:
                seg, block = _owner(CU_K, n_samples, pid, BLOCK)
            else:
                seg, block = _owner(CU_Q, n_samples, pid, BLOCK)
        q_start = tl.load(CU_Q + seg)
        k_start = tl.load(CU_K + seg)
        Lq = tl.load(CU_Q + seg + 1) - q_start
        Lk = tl.load(CU_K + seg + 1) - k_start
    return block * BLOCK, q_start.to(tl.int64), k_start.to(tl.int64), Lq, Lk


@triton.jit
def _tile(P, offs, n, stride, d0, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Rows `offs` and columns [d0, d0 + WIDTH) of an (n, HEAD_DIM) matrix: a (len(offs), WIDTH)
    tile. Rows >= n (past the sample's end) and columns >= HEAD_DIM read 0: they add 0 to dots."""
    offs_d = d0 + tl.arange(0, WIDTH)
    inside = (offs[:, None] < n) & (offs_d[None, :] < HEAD_DIM)
    return tl.load(P + offs[:, None] * stride + offs_d[None, :], mask=inside, other=0.0)


@triton.jit
def _rows(P, offs, n, stride, HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_REST: tl.constexpr):
    """Rows `offs` as two tiles, columns [0, D_MAIN) and [D_MAIN, D_MAIN + D_REST). Without a rest
    (D_REST = 0) the second is the first again, and the dots below never use it."""
    main = _tile(P, offs, n, stride, 0, D_MAIN, HEAD_DIM)
    rest = main
    if D_REST > 0:
        rest = _tile(P, offs, n, stride, D_MAIN, D_REST, HEAD_DIM)
    return main, rest


@triton.jit
def _zeros(ROWS: tl.constexpr, D_MAIN: tl.constexpr, D_REST: tl.constexpr):
    """Two fp32 accumulators of zeros, as _rows' two tiles."""
    main = tl.zeros((ROWS, D_MAIN), tl.float32)
    rest = main
    if D_REST > 0:
        rest = tl.zeros((ROWS, D_REST), tl.float32)
    return main, rest


@triton.jit
def _put_rows(P, offs, n, stride, x, x_rest, HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr,
              D_REST: tl.constexpr, ADD: tl.constexpr):
    """Store (or, if ADD, atomically add) the valid part of _rows' two tiles, in P's dtype."""
    for part in tl.static_range(2 if D_REST > 0 else 1):
        offs_d = tl.arange(0, D_REST if part else D_MAIN) + (D_MAIN if part else 0)
        inside = (offs[:, None] < n) & (offs_d[None, :] < HEAD_DIM)
        where = P + offs[:, None] * stride + offs_d[None, :]
        value = (x_rest if part else x).to(P.dtype.element_ty)
        if ADD:
            tl.atomic_add(where, value, mask=inside, sem="relaxed")
        else:
            tl.store(where, value, mask=inside)


@triton.jit
def _dot_nt(a, b, a_rest, b_rest, D_REST: tl.constexpr, DOT: tl.constexpr):
    """a @ b^T over all the head dim's columns: the main tiles' dot plus the rest tiles' dot."""
    s = tl.dot(a, tl.trans(b), input_precision=DOT)
    if D_REST > 0:
        s += tl.dot(a_rest, tl.trans(b_rest), input_precision=DOT)
    return s


@triton.jit
def _dot_acc(acc, acc_rest, p, b, b_rest, D_REST: tl.constexpr, DOT: tl.constexpr):
    """acc += p @ b, for the main and the rest columns of b; p is cast to b's dtype."""
    acc += tl.dot(p.to(b.dtype), b, input_precision=DOT)
    if D_REST > 0:
        acc_rest += tl.dot(p.to(b.dtype), b_rest, input_precision=DOT)
    return acc, acc_rest


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


# ==== The kernels: forward, then the backward (delta; dq; dk and dv, which can also add dq)

FWD_CHOICES = {
    64: [(128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 4)],
    128: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 8, 3)],
    256: [(64, 64, 4, 2), (64, 32, 4, 2)],
}


@_autotune((32, 16), FWD_CHOICES)
@triton.jit(do_not_specialize=["len_q", "len_k", "n_samples"])
def _fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K, TILES,  # pointers
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,  # strides: token, head
    n_heads, n_kv_heads, total_q, len_q, len_k, n_samples,  # sizes (len_q/k: one sample's)
    sm_scale, SEQ_POW2,  # scale, autotune length key
    HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_REST: tl.constexpr,  # D, its two tiles' widths
    PACKED: tl.constexpr, SEARCH: tl.constexpr, CAUSAL: tl.constexpr,  # switches
    DOT: tl.constexpr, COUNT: tl.constexpr,  # dot precision, tile counter
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # from the autotune configs
):
    """Forward. One program = one block of BLOCK_M queries of one sample, for one head. Writes O
    (contiguous, shaped as q) and LSE ((n_heads, total_q) fp32, log2 units); if COUNT, adds to
    TILES[0] the tiles computed and to TILES[1] the head-dim columns their q k^T dots spanned."""
    # ---- which queries: a block of one sample, one head
    # Last query blocks first: causal ones see the most keys; the heaviest work must not start last.
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    m0, q_start, k_start, Lq, Lk = _locate(CU_Q, CU_K, len_q, len_k, n_samples, pid,
                                           BLOCK_M, False, PACKED, SEARCH)
    head = tl.program_id(2)
    if m0 >= Lq:  # the grid is sized for the longest sample; shorter ones end here
        return
    # GQA: a group of query heads reads one K/V head, uncopied.
    kv_head = head // (n_heads // n_kv_heads)
    # Scores in log2 units: exp(x) = exp2(x * log2(e)), and exp2 is fast.
    qk_scale = sm_scale * 1.4426950408889634
    offs_m = m0 + tl.arange(0, BLOCK_M)
    Q += q_start * stride_qt + head * stride_qh  # this sample's queries, this head
    q, q_rest = _rows(Q, offs_m, Lq, stride_qt, HEAD_DIM, D_MAIN, D_REST)  # (BM, D_MAIN), (BM, D_REST)
    K += k_start * stride_kt + kv_head * stride_kh  # this sample's keys, this K/V head
    V += k_start * stride_vt + kv_head * stride_vh
    # ---- the online softmax over the key blocks
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running row maximum
    l_i = tl.zeros((BLOCK_M,), tl.float32)  # running denominator
    acc, acc_rest = _zeros(BLOCK_M, D_MAIN, D_REST)  # running numerator, as q's two tiles
    full, end = _key_range(m0, Lq, Lk, BLOCK_M, BLOCK_N, CAUSAL)
    # The same loop twice: key blocks [0, full) unmasked, then [full, end) masked.
    for MASKED in tl.static_range(2):
        for n0 in range(full if MASKED else 0, end if MASKED else full, BLOCK_N):
            # -- load a block of keys and values
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k, k_rest = _rows(K, offs_n, Lk, stride_kt, HEAD_DIM, D_MAIN, D_REST)  # (BN, ...)
            v, v_rest = _rows(V, offs_n, Lk, stride_vt, HEAD_DIM, D_MAIN, D_REST)  # (BN, ...)
            # -- compute the scores, in log2 units
            s = _dot_nt(q, k, q_rest, k_rest, D_REST, DOT) * qk_scale  # (BM, BN)
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
            acc = acc * alpha[:, None]
            acc_rest = acc_rest * alpha[:, None]
            acc, acc_rest = _dot_acc(acc, acc_rest, p, v, v_rest, D_REST, DOT)
            m_i = m_new
            if COUNT:  # test hook: the (query block, key block) tiles really computed
                tl.atomic_add(TILES, 1)
                tl.atomic_add(TILES + 1, D_MAIN + D_REST)
    # ---- write out = acc / l and lse
    # A query that sees no key (causal with Lq > Lk: the first Lq - Lk rows) has l = 0: it outputs
    # zeros, and lse = +inf makes its recomputed probabilities exactly 0 in the backward.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    O += q_start * n_heads * HEAD_DIM + head * HEAD_DIM  # contiguous (total_q, H, D)
    _put_rows(O, offs_m, Lq, n_heads * HEAD_DIM, acc / l_safe[:, None], acc_rest / l_safe[:, None],
              HEAD_DIM, D_MAIN, D_REST, False)
    # lse: log2 of the softmax denominator (in log2 units, as the scores)
    lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(LSE + head * total_q + q_start + offs_m, lse, mask=offs_m < Lq)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, n_rows, n_heads, total_q, HEAD_DIM: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
    """Backward, step 1: delta = rowsum(dO * O) for BLOCK of the n_rows = total_q * n_heads rows of
    the contiguous (total_q, n_heads, D) O and dO; stored as lse, (n_heads, total_q)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    o = _tile(O, rows, n_rows, HEAD_DIM, 0, BLOCK_D, HEAD_DIM)  # (BLOCK, BLOCK_D)
    do = _tile(DO, rows, n_rows, HEAD_DIM, 0, BLOCK_D, HEAD_DIM)  # (BLOCK, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK,)
    # Row r is token r // n_heads, head r % n_heads.
    tl.store(DELTA + (rows % n_heads) * total_q + rows // n_heads, delta, mask=rows < n_rows)


@_autotune((32, 16), {256: [(128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 8, 3), (64, 64, 4, 3)]})
@triton.jit(do_not_specialize=["len_q", "len_k", "n_samples"])
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, CU_Q, CU_K,  # pointers
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,  # strides: token, head
    n_heads, n_kv_heads, total_q, len_q, len_k, n_samples,  # sizes (len_q/k: one sample's)
    sm_scale, SEQ_POW2,  # scale, autotune length key
    HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_REST: tl.constexpr,  # D, its two tiles' widths
    PACKED: tl.constexpr, SEARCH: tl.constexpr, CAUSAL: tl.constexpr,  # switches
    DOT: tl.constexpr,  # dot precision
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # from the autotune configs
):
    """Backward, deterministic step 3: dq = scale * dS @ K for one block of queries, over the
    forward's key blocks, recomputing P = exp2(s - lse): three matmuls a tile."""
    # ---- which queries: the forward's block of one sample, one head
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    m0, q_start, k_start, Lq, Lk = _locate(CU_Q, CU_K, len_q, len_k, n_samples, pid,
                                           BLOCK_M, False, PACKED, SEARCH)
    head = tl.program_id(2)
    if m0 >= Lq:
        return
    kv_head = head // (n_heads // n_kv_heads)
    qk_scale = sm_scale * 1.4426950408889634
    offs_m = m0 + tl.arange(0, BLOCK_M)
    # ---- the block's q, dO, lse and delta
    Q += q_start * stride_qt + head * stride_qh
    q, q_rest = _rows(Q, offs_m, Lq, stride_qt, HEAD_DIM, D_MAIN, D_REST)  # (BM, ...)
    rows = q_start * n_heads * HEAD_DIM + head * HEAD_DIM  # dO, dQ: contiguous
    do, do_rest = _rows(DO + rows, offs_m, Lq, n_heads * HEAD_DIM, HEAD_DIM, D_MAIN, D_REST)
    lse = tl.load(LSE + head * total_q + q_start + offs_m, mask=offs_m < Lq, other=float("inf"))
    delta = tl.load(DELTA + head * total_q + q_start + offs_m, mask=offs_m < Lq, other=0.0)
    K += k_start * stride_kt + kv_head * stride_kh
    V += k_start * stride_vt + kv_head * stride_vh
    # ---- dq over the key blocks the forward visited
    dq, dq_rest = _zeros(BLOCK_M, D_MAIN, D_REST)
    full, end = _key_range(m0, Lq, Lk, BLOCK_M, BLOCK_N, CAUSAL)
    for MASKED in tl.static_range(2):
        for n0 in range(full if MASKED else 0, end if MASKED else full, BLOCK_N):
            # -- load a block of keys and values
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k, k_rest = _rows(K, offs_n, Lk, stride_kt, HEAD_DIM, D_MAIN, D_REST)  # (BN, ...)
            v, v_rest = _rows(V, offs_n, Lk, stride_vt, HEAD_DIM, D_MAIN, D_REST)  # (BN, ...)
            # -- recompute the probabilities P = exp2(s - lse)
            s = _dot_nt(q, k, q_rest, k_rest, D_REST, DOT) * qk_scale  # (BM, BN)
            p = tl.math.exp2(s - lse[:, None])  # (BM, BN)
            if MASKED:
                p = tl.where(_visible(offs_m, offs_n, Lk, Lk - Lq, CAUSAL), p, 0.0)
            # -- softmax backward: dS = P * (dP - rowsum(dO * O))
            dp = _dot_nt(do, v, do_rest, v_rest, D_REST, DOT)  # (BM, BN) dL/dP
            ds = p * (dp - delta[:, None])  # (BM, BN)
            # -- update dq
            dq, dq_rest = _dot_acc(dq, dq_rest, ds, k, k_rest, D_REST, DOT)
    _put_rows(DQ + rows, offs_m, Lq, n_heads * HEAD_DIM, dq * sm_scale, dq_rest * sm_scale,
              HEAD_DIM, D_MAIN, D_REST, False)


DKDV_CHOICES = {256: [(64, 128, 8, 3), (64, 64, 8, 3), (32, 64, 8, 3), (64, 64, 4, 3)]}


# Tuning runs the kernel several times: DQ_ACC, which it adds to, is zeroed before each run.
@_autotune((16, 32), DKDV_CHOICES, key=KEY + ["ATOMIC_DQ"], reset_to_zero=["DQ_ACC"])
@triton.jit(do_not_specialize=["len_q", "len_k", "n_samples"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, DQ_ACC, LSE, DELTA, CU_Q, CU_K,  # pointers
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,  # strides: token, head
    n_heads, n_kv_heads, total_q, len_q, len_k, n_samples,  # sizes (len_q/k: one sample's)
    sm_scale, SEQ_POW2,  # scale, autotune length key
    HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_REST: tl.constexpr,  # D, its two tiles' widths
    PACKED: tl.constexpr, SEARCH: tl.constexpr, CAUSAL: tl.constexpr,  # switches
    DOT: tl.constexpr, ATOMIC_DQ: tl.constexpr,  # dot precision, also add dq (fp32) into DQ_ACC
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # from the autotune configs
):
    """Backward, step 2: dv = P^T @ dO and dk = scale * dS^T @ Q for one block of BLOCK_N keys of
    one sample and one K/V head (four matmuls a tile). It loops over the query heads of its GQA
    group and the query blocks that see these keys, summing dk, dv in registers. With ATOMIC_DQ,
    a fifth matmul dS @ K gives these keys' share of dq, atomically added to DQ_ACC."""
    # ---- which keys: a block of one sample, one K/V head
    n0, q_start, k_start, Lq, Lk = _locate(CU_Q, CU_K, len_q, len_k, n_samples, tl.program_id(0),
                                           BLOCK_N, True, PACKED, SEARCH)
    kv_head = tl.program_id(2)
    if n0 >= Lk:
        return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    K += k_start * stride_kt + kv_head * stride_kh
    V += k_start * stride_vt + kv_head * stride_vh
    k, k_rest = _rows(K, offs_n, Lk, stride_kt, HEAD_DIM, D_MAIN, D_REST)  # (BN, ...)
    v, v_rest = _rows(V, offs_n, Lk, stride_vt, HEAD_DIM, D_MAIN, D_REST)  # (BN, ...)
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
    dk, dk_rest = _zeros(BLOCK_N, D_MAIN, D_REST)
    dv, dv_rest = _zeros(BLOCK_N, D_MAIN, D_REST)
    for head in range(kv_head * group, kv_head * group + group):
        Qh = Q + q_start * stride_qt + head * stride_qh
        rows = q_start * n_heads * HEAD_DIM + head * HEAD_DIM  # dO, DQ_ACC: contiguous
        LSEh = LSE + head * total_q + q_start
        DELTAh = DELTA + head * total_q + q_start
        for MASKED in tl.static_range(2):
            # Query rows past the sample's end load q = 0, dO = 0, lse = +inf: P, dS are exactly 0.
            for m0 in range(lo if MASKED else mid, mid if MASKED else Lq, BLOCK_M):
                # -- load a block of queries, their dO, lse and delta
                offs_m = m0 + tl.arange(0, BLOCK_M)
                q, q_rest = _rows(Qh, offs_m, Lq, stride_qt, HEAD_DIM, D_MAIN, D_REST)
                do, do_rest = _rows(DO + rows, offs_m, Lq, n_heads * HEAD_DIM, HEAD_DIM, D_MAIN,
                                    D_REST)  # (BM, ...)
                lse = tl.load(LSEh + offs_m, mask=offs_m < Lq, other=float("inf"))
                delta = tl.load(DELTAh + offs_m, mask=offs_m < Lq, other=0.0)
                # -- recompute the probabilities, transposed: P^T = exp2(s^T - lse)
                sT = _dot_nt(k, q, k_rest, q_rest, D_REST, DOT) * qk_scale  # (BN, BM)
                pT = tl.math.exp2(sT - lse[None, :])  # (BN, BM)
                if MASKED:
                    pT = tl.where(offs_n[:, None] <= offs_m[None, :] + shift, pT, 0.0)
                # -- update dv
                dv, dv_rest = _dot_acc(dv, dv_rest, pT, do, do_rest, D_REST, DOT)
                # -- softmax backward dS^T = P^T * (dP^T - delta), then update dk
                dpT = _dot_nt(v, do, v_rest, do_rest, D_REST, DOT)  # (BN, BM)
                dsT = pT * (dpT - delta[None, :])
                dk, dk_rest = _dot_acc(dk, dk_rest, dsT, q, q_rest, D_REST, DOT)
                if ATOMIC_DQ:  # -- these keys' share of dq = dS @ K (unscaled), added in fp32
                    dq, dq_rest = _zeros(BLOCK_M, D_MAIN, D_REST)
                    dq, dq_rest = _dot_acc(dq, dq_rest, tl.trans(dsT), k, k_rest, D_REST, DOT)
                    _put_rows(DQ_ACC + rows, offs_m, Lq, n_heads * HEAD_DIM, dq, dq_rest,
                              HEAD_DIM, D_MAIN, D_REST, True)
    # ---- write dk and dv
    # Keys that no query sees (e.g. past every diagonal) still get their zeros written here.
    rows = k_start * n_kv_heads * HEAD_DIM + kv_head * HEAD_DIM  # dK, dV: contiguous
    _put_rows(DK + rows, offs_n, Lk, n_kv_heads * HEAD_DIM, dk * sm_scale, dk_rest * sm_scale,
              HEAD_DIM, D_MAIN, D_REST, False)
    _put_rows(DV + rows, offs_n, Lk, n_kv_heads * HEAD_DIM, dv, dv_rest,
              HEAD_DIM, D_MAIN, D_REST, False)


# ==== Launching the kernels

def _empty_like(x):
    """An uninitialised buffer with x's shape, dtype and device, from _empty (the tests' hook)."""
    return _empty(x.shape, dtype=x.dtype, device=x.device)


def _grid(block, longest, total, n_samples, heads, search):
    """(programs along the sequence, samples, heads). With a known longest sample: its blocks, once
    per sample. With search (no maximum known): total // block + n_samples programs, which _owner
    shares out among the samples; the second axis is then 1. One sample: longest = total."""
    if search:
        return (total // block + n_samples, 1, heads)
    return (max(1, triton.cdiv(longest, block)), n_samples, heads)


class _FlashAttention(torch.autograd.Function):
    """Launches the kernels. It saves q, k, v, the output and lse, not the probabilities: the
    backward recomputes those tile by tile. Launches pass every argument by the kernel's parameter
    name, except BLOCK_M and BLOCK_N, which the autotuner adds from its configs. Nothing here reads
    a device tensor: the grids come from shapes and from the lengths the caller gave."""

    @staticmethod
    def forward(ctx, q, k, v, causal, cu_q, cu_k, max_q, max_k, scale, deterministic, tiles):
        total_q, n_heads, D = q.shape
        total_k, n_kv_heads, _ = k.shape
        packed = cu_q is not None
        search = packed and max_q is None
        d_main, d_rest = _split_head_dim(D)
        # ---- the arguments the kernels share, by parameter name
        ctx.strides = dict(
            stride_qt=q.stride(0), stride_qh=q.stride(1),
            stride_kt=k.stride(0), stride_kh=k.stride(1),
            stride_vt=v.stride(0), stride_vh=v.stride(1),
        )
        ctx.longest_q = total_q if max_q is None else max_q
        ctx.longest_k = total_k if max_k is None else max_k
        # SEQ_POW2, the longest sample (or the total, when no maximum is known) rounded up to 2^k,
        # is only a key of the autotuner's cache.
        seq_pow2 = max(16, triton.next_power_of_2(max(ctx.longest_q, ctx.longest_k)))
        ctx.sizes = dict(
            n_heads=n_heads, n_kv_heads=n_kv_heads, total_q=total_q,
            len_q=total_q, len_k=total_k, n_samples=len(cu_q) - 1 if packed else 1,
            sm_scale=scale, SEQ_POW2=seq_pow2,
        )
        ctx.meta = dict(  # constexprs; BLOCK_M and BLOCK_N come from the autotuner
            HEAD_DIM=D, D_MAIN=d_main, D_REST=d_rest, PACKED=packed, SEARCH=search, CAUSAL=causal,
            DOT="tf32x3" if q.dtype == torch.float32 else "tf32",  # fp32: ~fp32-exact 3xTF32 dots
        )
        ctx.cu = (cu_q, cu_k)
        ctx.deterministic = deterministic
        o = _empty((total_q, n_heads, D), dtype=q.dtype, device=q.device)
        lse = _empty((n_heads, total_q), dtype=torch.float32, device=q.device)  # log2 units
        # Unused pointer slots (one sample has no offsets; no tile counter) get lse: never read.
        offsets = dict(CU_Q=cu_q, CU_K=cu_k) if packed else dict(CU_Q=lse, CU_K=lse)

        def grid(meta):
            """One program per (query block, sample, head): see _grid."""
            return _grid(meta["BLOCK_M"], ctx.longest_q, total_q, ctx.sizes["n_samples"], n_heads,
                         search)

        _fwd_kernel[grid](
            Q=q, K=k, V=v, O=o, LSE=lse, **offsets, TILES=lse if tiles is None else tiles,
            **ctx.strides,
            **ctx.sizes,
            COUNT=tiles is not None, **ctx.meta,
        )
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        total_q, n_heads, D = q.shape
        total_k, n_kv_heads, _ = k.shape
        # Autograd may hand over an expanded (stride 0) or transposed gradient.
        do = do.contiguous()
        dq = _empty_like(q)
        dk = _empty_like(k)
        dv = _empty_like(v)
        delta = _empty_like(lse)  # rowsum(dO * O), (n_heads, total_q)
        cu_q, cu_k = ctx.cu
        offsets = dict(CU_Q=lse, CU_K=lse) if cu_q is None else dict(CU_Q=cu_q, CU_K=cu_k)
        search = ctx.meta["SEARCH"]
        n_samples = ctx.sizes["n_samples"]

        def dq_grid(meta):
            """One program per (query block, sample, head), as the forward."""
            return _grid(meta["BLOCK_M"], ctx.longest_q, total_q, n_samples, n_heads, search)

        def dkdv_grid(meta):
            """One program per (key block, sample, K/V head)."""
            return _grid(meta["BLOCK_N"], ctx.longest_k, total_k, n_samples, n_kv_heads, search)

        # ---- step 1: delta = rowsum(dO * O), one program per 64 (token, head) rows
        rows = total_q * n_heads
        block = 32 if INTERPRET else 64
        _bwd_delta_kernel[(max(1, triton.cdiv(rows, block)),)](
            O=o, DO=do, DELTA=delta, n_rows=rows, n_heads=n_heads, total_q=total_q,
            HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK=block,
        )
        # ---- step 2: dk and dv; unless deterministic, also dq, added up in fp32 by atomics
        atomic = not ctx.deterministic
        # Deterministic: DQ_ACC is not used and dq fills its slot (written only in step 3).
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if atomic else dq
        _bwd_dkdv_kernel[dkdv_grid](
            Q=q, K=k, V=v, DO=do, DK=dk, DV=dv, DQ_ACC=dq_acc, LSE=lse, DELTA=delta, **offsets,
            **ctx.strides,
            **ctx.sizes,
            ATOMIC_DQ=atomic, **ctx.meta,
        )
        # ---- step 3: dq, scaled and cast from the fp32 sums, or from its own kernel
        if atomic:
            dq = (dq_acc * ctx.sizes["sm_scale"]).to(q.dtype)
        else:
            _bwd_dq_kernel[dq_grid](
                Q=q, K=k, V=v, DO=do, DQ=dq, LSE=lse, DELTA=delta, **offsets,
                **ctx.strides,
                **ctx.sizes,
                **ctx.meta,
            )
        # No gradient for causal, cu_q, cu_k, max_q, max_k, scale, deterministic, tiles.
        return dq, dk, dv, None, None, None, None, None, None, None, None


def _on_host(t):
    """Whether reading t's values is free (CPU memory). Offsets on a GPU are never read here: that
    would wait for the GPU; check them where you build them, on the host."""
    return t.device.type == "cpu"


def _check_cu(name, cu, total, device, longest, max_name):
    """Validate one cu_seqlens tensor: its type and device always; its values, and that the caller's
    maximum `longest` (None: not given) covers every sample, only where reading them is free."""
    is_offsets = isinstance(cu, torch.Tensor) and cu.dtype == torch.int32 and cu.dim() == 1
    if not is_offsets or cu.numel() < 2:
        raise ValueError(f"{name} must be a 1-D int32 tensor [0, ..., total], got {cu!r:.80}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    if longest is not None and not isinstance(longest, int):
        raise ValueError(f"{max_name} must be a Python int (a tensor would be read from the device), "
                         f"got {type(longest).__name__}")
    if not _on_host(cu):
        return
    vals = cu.tolist()
    if vals[0] != 0 or any(b < a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"{name} must start at 0 and be non-decreasing, got {vals[:8]}...")
    if vals[-1] != total:
        raise ValueError(f"{name} must end at the total length {total}, but ends at {vals[-1]}")
    longest_sample = max(b - a for a, b in zip(vals, vals[1:]))
    if longest is not None and longest < longest_sample:
        raise ValueError(f"{max_name}={longest} is shorter than the longest sample "
                         f"({longest_sample}): pass the true maximum, or None")


def attention(q, k, v, causal=False, cu_seqlens_q=None, cu_seqlens_k=None, scale=None, *,
              max_seqlen_q=None, max_seqlen_k=None, deterministic=False, _tiles=None):
    """softmax(q k^T * scale [+ mask]) v, per sample and per head. q: (total_q, n_heads, D),
    k, v: (total_k, n_kv_heads, D) with n_heads a multiple of n_kv_heads (GQA), D <= 256.
    cu_seqlens_q/k: int32 (n_samples + 1,) offsets of the packed samples; None means one sample.
    max_seqlen_q/k: Python ints, the longest sample's lengths, if the caller knows them (a grid
    sized by them; without them a grid that needs no maximum). Offsets and maxima on a GPU are
    trusted, never read (no host sync); on the CPU they are checked. causal: query i of a sample
    sees key j iff j <= i + (Lk - Lq) (bottom-right aligned, as in prefill after cached tokens); a
    query that sees no key gets zeros. deterministic: compute dq in its own kernel, bit-identical
    from run to run, instead of by fp32 atomic adds (faster, but the order of the additions varies).
    Returns (total_q, n_heads, D). _tiles: an int32 (2,) counter of tiles and dot columns (tests)."""
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
    # ---- the samples: their offsets, and the longest one's lengths if the caller knows them
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("give both cu_seqlens_q and cu_seqlens_k, or neither")
    if (max_seqlen_q is None) != (max_seqlen_k is None):
        raise ValueError("give both max_seqlen_q and max_seqlen_k, or neither")
    if cu_seqlens_q is None and max_seqlen_q is not None:
        raise ValueError("max_seqlen_q/k go with cu_seqlens_q/k; one sample needs neither")
    if cu_seqlens_q is not None:
        _check_cu("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device, max_seqlen_q, "max_seqlen_q")
        _check_cu("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device, max_seqlen_k, "max_seqlen_k")
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k have {len(cu_seqlens_q)} and "
                             f"{len(cu_seqlens_k)} entries")
    # ---- run
    # The kernels need stride 1 in D; other strides are passed as they are.
    q, k, v = [x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v)]
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    return _FlashAttention.apply(q, k, v, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                 max_seqlen_k, scale, deterministic, _tiles)


# ==== The oracle and the self-check (`python kernels.py`)

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
    # lengths of the q samples, of the k samples, heads, K/V heads, D, causal, dtype, tolerance,
    # and attention's options: both backward paths, grids with and without the longest lengths
    cases = [
        ([37], [37], 4, 4, 64, True, torch.float32, 1e-5, dict(deterministic=True)),
        ([5, 1, 40], [5, 1, 40], 6, 2, 72, False, torch.bfloat16, 1e-2, dict()),
        ([3, 20], [30, 20], 7, 1, 128, True, torch.float16, 1e-3, dict(max_seqlen_q=20, max_seqlen_k=30)),
    ]
    for lq, lk, h, h_kv, d, causal, dtype, tol, options in cases:
        cu_q = torch.tensor([0] + lq, device=device).cumsum(0).int()
        cu_k = torch.tensor([0] + lk, device=device).cumsum(0).int()
        q = torch.randn(sum(lq), h, d, device=device, dtype=dtype)
        k = torch.randn(sum(lk), h_kv, d, device=device, dtype=dtype)
        v = torch.randn(sum(lk), h_kv, d, device=device, dtype=dtype)
        grad = torch.randn(sum(lq), h, d, device=device, dtype=dtype)
        def kernel(*args, options=options):
            """attention with this case's options."""
            return attention(*args, **options)

        # The kernel, then the reference in float64, each on its own leaf copies of q, k, v.
        runs = [
            (kernel, [t.clone().requires_grad_() for t in (q, k, v)]),
            (_plain, [t.double().requires_grad_() for t in (q, k, v)]),
        ]
        outs = []  # per run: [out, dq, dk, dv]
        for fn, x in runs:
            out = fn(*x, causal, cu_q, cu_k)
            out.backward(grad.to(out.dtype))
            outs.append([out.detach()] + [t.grad for t in x])
        errs = [((a.double() - b).norm() / b.norm()).item() for a, b in zip(*outs)]
        print(f"self-check {str(dtype)[6:]:8} D={d:3} causal={causal!s:5} rel. err out/dq/dk/dv: "
              + " ".join(f"{e:.1e}" for e in errs) + f"  {options}")
        if not all(e <= tol for e in errs):  # NaN fails too
            raise SystemExit(f"self-check FAILED: error above {tol}")


if __name__ == "__main__":
    _self_check("cuda" if torch.cuda.is_available() else "cpu")
    print("self-check passed; the timings (GPU only): python benchmarks/attention.py")
