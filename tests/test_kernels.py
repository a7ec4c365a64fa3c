"""Tests for kernels.py: the Triton flash-attention kernels, forward and gradients, against float64.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the sizes
are small; packed lengths of 1, odd, and not multiples of the block sizes (16 and 32 in the interpreter)
exercise every mask. Each test draws its own random inputs (seeded from the test's name, so a failure
reproduces).
"""
import sys
import zlib

import pytest
import torch

import kernels

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def fresh_inputs_and_poisoned_outputs(request, monkeypatch):
    """Seed per test, and make every buffer the wrapper allocates (output, lse, delta, dq, dk, dv) start
    as NaN instead of torch.empty's leftovers: an element the kernels forget to write then fails."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    monkeypatch.setattr(kernels, "_empty", lambda shape, **kw: torch.full(shape, float("nan"), **kw))


def cu(lens):
    return torch.tensor([0] + list(lens)).cumsum(0).to(torch.int32)


def reference(q, k, v, lens_q, lens_k, causal, scale):
    """float64 attention with explicit masks, one packed sample at a time."""
    q, k, v = q.double(), k.double(), v.double()
    group, out, q0, k0 = q.shape[1] // k.shape[1], [], 0, 0
    for lq, lk in zip(lens_q, lens_k):
        ks = k[k0:k0 + lk].repeat_interleave(group, dim=1)  # (Lk, H, D)
        vs = v[k0:k0 + lk].repeat_interleave(group, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[q0:q0 + lq], ks) * scale  # (H, Lq, Lk)
        i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
        visible = j <= i + (lk - lq) if causal else torch.ones(lq, lk, dtype=torch.bool)  # bottom-right causal
        p = torch.softmax(s.masked_fill(~visible, torch.finfo(s.dtype).min), dim=-1) * visible  # no key: zeros
        out.append(torch.einsum("hqk,khd->qhd", p, vs))
        q0, k0 = q0 + lq, k0 + lk
    return torch.cat(out)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check(lens_q, lens_k, n_heads, n_kv_heads, d, causal, dtype, packed=True, scale=None, **options):
    """Run the kernel forward and backward and compare output and dq, dk, dv with the float64 reference.
    options: attention's keyword options (max_seqlen_q/k, deterministic)."""
    q = torch.randn(sum(lens_q), n_heads, d, dtype=dtype, requires_grad=True)
    k = torch.randn(sum(lens_k), n_kv_heads, d, dtype=dtype, requires_grad=True)
    v = torch.randn(sum(lens_k), n_kv_heads, d, dtype=dtype, requires_grad=True)
    grad = torch.randn(sum(lens_q), n_heads, d, dtype=dtype)
    cus = (cu(lens_q), cu(lens_k)) if packed else (None, None)
    out = kernels.attention(q, k, v, causal, *cus, scale=scale, **options)
    out.backward(grad)
    assert out.shape == q.shape and out.dtype == dtype
    q64, k64, v64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = reference(q64, k64, v64, lens_q, lens_k, causal, d ** -0.5 if scale is None else scale)
    ref.backward(grad.double())
    for name, got, want in [("out", out, ref), ("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad),
                            ("dv", v.grad, v64.grad)]:
        assert torch.isfinite(got).all(), f"{name} has NaN/inf: an element was not written"
        assert rel_err(got, want) <= TOL[dtype], f"{name}: rel. error {rel_err(got, want):.2e}"


PACKED = ([1, 19, 40], [1, 19, 40])  # a 1-token sample, an odd one, one spanning blocks unevenly


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [16, 64, 72, 128])
def test_head_dims_dtypes_causal(d, causal, dtype):
    check(*PACKED, n_heads=4, n_kv_heads=2, d=d, causal=causal, dtype=dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("group", [1, 2, 7])
def test_gqa_ratios(group, causal):
    check(*PACKED, n_heads=group, n_kv_heads=1, d=64, causal=causal, dtype=torch.float32)
    check([5, 33], [5, 33], n_heads=2 * group, n_kv_heads=2, d=32, causal=causal, dtype=torch.bfloat16)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lens_q, lens_k", [
    ([4, 1, 21], [20, 37, 21]),  # prefill after cached keys, one-token decode, a plain sample
    ([30, 2], [3, 2]),  # more queries than keys: with causal, the first 27 queries see nothing
    ([0, 9], [5, 9]),  # an empty sample (queries see no key at all) is allowed
    ([40, 7], [41, 24]),  # a query block's last row alone sees the first key of a key block
])
def test_query_length_differs_from_key_length(lens_q, lens_k, causal):
    check(lens_q, lens_k, n_heads=6, n_kv_heads=3, d=72, causal=causal, dtype=torch.float32)


@pytest.mark.parametrize("causal", [False, True])
def test_one_sequence_without_cu_seqlens(causal):
    check([23], [50], n_heads=2, n_kv_heads=1, d=64, causal=causal, dtype=torch.float32, packed=False, scale=0.3)


def test_queries_that_see_no_key_output_zeros():
    q, k, v = torch.randn(10, 2, 16), torch.randn(4, 2, 16), torch.randn(4, 2, 16)
    out = kernels.attention(q, k, v, causal=True)  # query i sees keys j <= i - 6
    assert (out[:6] == 0).all() and out[6:].abs().sum() > 0


def test_strided_views_of_a_fused_qkv_tensor():
    qkv = torch.randn(45, 3, 4, 72, requires_grad=True)  # (T, 3, H, D): q, k, v are non-contiguous views
    lens = [13, 32]
    out = kernels.attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], True, cu(lens), cu(lens))
    grad = torch.randn_like(out)
    out.backward(grad)
    x = qkv.detach().double().requires_grad_()
    ref = reference(x[:, 0], x[:, 1], x[:, 2], lens, lens, True, 72 ** -0.5)
    ref.backward(grad.double())
    assert rel_err(out, ref) <= 1e-5 and rel_err(qkv.grad, x.grad) <= 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_tiles_outside_a_sample_are_skipped(causal):
    """Count the (query block, key block) tiles the forward computes, with the kernel's debug counter.
    Expected: for each sample and head, only the key blocks of that sample that hold a key some query of
    the block may see; so the cost follows sum(s_i^2), not (sum s_i)^2."""
    cfg = kernels._fwd_kernel.configs[0].kwargs  # the interpreter's one block-size choice
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    lens, n_heads = [40, 1, 33, 45, 5, 37, 50], 2
    q, k, v = torch.randn(sum(lens), n_heads, 16), torch.randn(sum(lens), 1, 16), torch.randn(sum(lens), 1, 16)
    tiles = torch.zeros(2, dtype=torch.int32)  # tiles, dot columns
    kernels.attention(q, k, v, causal, cu(lens), cu(lens), _tiles=tiles)
    expected = 0
    for n in lens:
        for m0 in range(0, n, bm):
            last_key = min(n - 1, m0 + bm - 1) if causal else n - 1  # the last key any query of the block sees
            expected += n_heads * (last_key // bn + 1)
    dense = n_heads * -(-sum(lens) // bm) * -(-sum(lens) // bn)  # one unpacked sequence, no masks skipped
    assert tiles[0].item() == expected
    assert tiles[0].item() < dense / 2


def test_self_check_runs():
    kernels._self_check("cpu")  # what `python kernels.py` runs before its (GPU only) benchmark


def _inputs(tq=8, tk=8, h=4, h_kv=2, d=16, dtype=torch.float32):
    return [torch.randn(n, heads, d, dtype=dtype) for n, heads in ((tq, h), (tk, h_kv), (tk, h_kv))]


@pytest.mark.parametrize("make, match", [
    (lambda: (torch.randn(8, 64), *_inputs()[1:]), "expected q"),  # q without a head axis
    (lambda: (_inputs()[0], torch.randn(8, 2, 16), torch.randn(9, 2, 16)), "expected q"),  # k, v lengths differ
    (lambda: (torch.randn(8, 4, 32), *_inputs()[1:]), "expected q"),  # head dims differ
    (lambda: (_inputs()[0].half(), *_inputs()[1:]), "dtype"),
    (lambda: _inputs(dtype=torch.float64), "dtype"),
    (lambda: (_inputs()[0], _inputs()[1].to("meta"), _inputs()[2]), "device"),
    (lambda: _inputs(h=4, h_kv=3), "multiple of n_kv_heads"),
    (lambda: _inputs(d=264), "head dim"),
])
def test_bad_inputs_raise(make, match):
    with pytest.raises(ValueError, match=match):
        kernels.attention(*make())


@pytest.mark.parametrize("cu_q, cu_k, match", [
    (cu([3, 5]).long(), cu([3, 5]), "int32"),
    (cu([3, 5]), torch.tensor([0, 6, 2, 8], dtype=torch.int32), "non-decreasing"),
    (cu([3, 5]), torch.tensor([1, 6, 8], dtype=torch.int32), "start at 0"),
    (cu([3, 5]), cu([3, 6]), "end at the total length 8"),
    (cu([3, 5]), cu([2, 3, 3]), "entries"),
    (cu([3, 5]), None, "both"),
])
def test_bad_cu_seqlens_raise(cu_q, cu_k, match):
    with pytest.raises(ValueError, match=match):
        kernels.attention(*_inputs(), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


@pytest.mark.parametrize("cu_q, options, match", [
    (cu([3, 5]), dict(max_seqlen_q=4, max_seqlen_k=5), "max_seqlen_q=4 is shorter than the longest sample"),
    (cu([3, 5]), dict(max_seqlen_q=torch.tensor(5), max_seqlen_k=5), "Python int"),
    (cu([3, 5]), dict(max_seqlen_q=5), "both max_seqlen_q and max_seqlen_k"),
    (None, dict(max_seqlen_q=8, max_seqlen_k=8), "go with cu_seqlens"),
])
def test_bad_max_seqlen_raise(cu_q, options, match):
    with pytest.raises(ValueError, match=match):
        kernels.attention(*_inputs(), cu_seqlens_q=cu_q, cu_seqlens_k=cu_q, **options)


# ---- issue 18: no host sync, one sample without offsets, head dims split, the five-matmul backward

DEVICE_READS = ["tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "__array__"]


def spy_on_device_reads(monkeypatch):
    """Record each call of a Tensor method that copies values to the host (on a GPU: waits for it) made
    by kernels.py's own code. The interpreter's copies (Triton's frames) and its bf16 rounding emulation
    (_convert_float, CPU only) are not the wrapper's and are not counted."""
    reads = []

    def spy(name, original):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename == kernels.__file__ and caller.co_name != "_convert_float":
                reads.append(f"{name} in {caller.co_name}")
            return original(self, *args, **kwargs)
        return read

    for name in DEVICE_READS:
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    return reads


def test_attention_reads_nothing_from_the_device(monkeypatch):
    """Packed (with and without max_seqlen) and one-sample calls, forward and backward, read no tensor's
    values when the tensors are on a GPU. On CPU every tensor is in host memory, so the wrapper's `_on_host`
    is made to answer as for a GPU; first, with the real `_on_host`, the spy must see the CPU-only checks."""
    lens = [5, 1, 20]
    q, k, v = [torch.randn(sum(lens), 2, 16, requires_grad=True) for _ in range(3)]
    calls = [dict(cu_seqlens_q=cu(lens), cu_seqlens_k=cu(lens)),
             dict(cu_seqlens_q=cu(lens), cu_seqlens_k=cu(lens), max_seqlen_q=20, max_seqlen_k=20),
             dict()]
    reads = spy_on_device_reads(monkeypatch)
    kernels.attention(q, k, v, True, **calls[0])
    assert any(read.startswith("tolist") for read in reads), "the spy misses the CPU offsets check"
    reads.clear()
    monkeypatch.setattr(kernels, "_on_host", lambda t: False, raising=False)
    for options in calls:
        kernels.attention(q, k, v, True, **options).sum().backward()
    assert reads == []


def launches_of(kernel, monkeypatch):
    """The keyword arguments of every launch of `kernel` from now on (each still runs)."""
    launches = []
    run = kernel.run

    def record(*args, **kwargs):
        launches.append(kwargs)
        return run(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", record)
    return launches


def test_one_sample_launches_without_offsets(monkeypatch):
    """One sample goes in as scalar lengths (PACKED off): no offsets tensor is built or passed."""
    launches = launches_of(kernels._fwd_kernel, monkeypatch)
    q, k, v = _inputs(tq=9, tk=21)
    kernels.attention(q, k, v, causal=True)
    assert launches[0]["PACKED"] is False
    assert (launches[0]["len_q"], launches[0]["len_k"]) == (9, 21)
    assert launches[0]["CU_Q"].dtype != torch.int32 and launches[0]["CU_K"].dtype != torch.int32


@pytest.mark.parametrize("causal", [False, True])
def test_packed_with_max_seqlen(causal):
    """The grid sized by the caller's maxima (one program row per sample) gives the same answers."""
    lens_q, lens_k = [4, 1, 40, 7], [20, 37, 41, 24]
    check(lens_q, lens_k, n_heads=2, n_kv_heads=1, d=64, causal=causal, dtype=torch.float32,
          max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))


@pytest.mark.parametrize("d, dtype", [(40, torch.float32), (72, torch.bfloat16), (80, torch.float16),
                                      (96, torch.float32), (112, torch.bfloat16)])
def test_head_dims_not_powers_of_two(d, dtype):
    check(*PACKED, n_heads=2, n_kv_heads=1, d=d, causal=True, dtype=dtype)


@pytest.mark.parametrize("d, widths", [
    (72, (64, 16)), (40, (32, 16)), (80, (64, 16)), (96, (64, 32)),  # a power of two + a rest of >= 16
    (112, (128, 0)), (64, (64, 0)), (8, (16, 0)), (200, (256, 0)),  # two tiles would not be narrower
])
def test_head_dim_split_and_the_work_it_saves(d, widths):
    """The dots' widths follow the rule in _split_head_dim's docstring, and the forward's counter shows
    that each tile's q k^T dot spans exactly those columns: 80 for D = 72, not the 128 of padding."""
    assert kernels._split_head_dim(d) == widths
    if d not in (72, 40):
        return
    q, k, v = _inputs(tq=40, tk=40, d=d)
    tiles = torch.zeros(2, dtype=torch.int32)  # tiles, dot columns
    kernels.attention(q, k, v, _tiles=tiles)
    padded = 1 << (d - 1).bit_length()
    assert tiles[1].item() == tiles[0].item() * sum(widths) < tiles[0].item() * padded


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("d, dtype", [(72, torch.bfloat16), (64, torch.float32)])
def test_both_backward_paths(deterministic, d, dtype, monkeypatch):
    """The five-matmul backward (atomic dq) and the deterministic two-kernel one both match the oracle,
    and the flag picks the dq kernel."""
    dq_launches = launches_of(kernels._bwd_dq_kernel, monkeypatch)
    check([4, 1, 21], [20, 37, 21], n_heads=4, n_kv_heads=2, d=d, causal=True, dtype=dtype,
          deterministic=deterministic)
    assert len(dq_launches) == (1 if deterministic else 0)


def test_deterministic_backward_is_bit_identical():
    lens = [13, 1, 30]
    x = [torch.randn(sum(lens), 2, 72, dtype=torch.bfloat16) for _ in range(3)]
    grad = torch.randn(sum(lens), 2, 72, dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in x]
        kernels.attention(*leaves, True, cu(lens), cu(lens), deterministic=True).backward(grad)
        runs.append([t.grad for t in leaves])
    for first, second in zip(*runs):
        assert torch.equal(first, second)
