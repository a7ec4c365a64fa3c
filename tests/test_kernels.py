"""Tests for kernels.py: the Triton flash-attention kernels, forward and gradients, against float64.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the sizes
are small; packed lengths of 1, odd, and not multiples of the block sizes (16 and 32 in the interpreter)
exercise every mask. Each test draws its own random inputs (seeded from the test's name, so a failure
reproduces).
"""
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


def check(lens_q, lens_k, n_heads, n_kv_heads, d, causal, dtype, packed=True, scale=None):
    """Run the kernel forward and backward and compare output and dq, dk, dv with the float64 reference."""
    q = torch.randn(sum(lens_q), n_heads, d, dtype=dtype, requires_grad=True)
    k = torch.randn(sum(lens_k), n_kv_heads, d, dtype=dtype, requires_grad=True)
    v = torch.randn(sum(lens_k), n_kv_heads, d, dtype=dtype, requires_grad=True)
    grad = torch.randn(sum(lens_q), n_heads, d, dtype=dtype)
    cus = (cu(lens_q), cu(lens_k)) if packed else (None, None)
    out = kernels.attention(q, k, v, causal, *cus, scale=scale)
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
    tiles = torch.zeros(1, dtype=torch.int32)
    kernels.attention(q, k, v, causal, cu(lens), cu(lens), _tiles=tiles)
    expected = 0
    for n in lens:
        for m0 in range(0, n, bm):
            last_key = min(n - 1, m0 + bm - 1) if causal else n - 1  # the last key any query of the block sees
            expected += n_heads * (last_key // bn + 1)
    dense = n_heads * -(-sum(lens) // bm) * -(-sum(lens) // bn)  # one unpacked sequence, no masks skipped
    assert tiles.item() == expected
    assert tiles.item() < dense / 2


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
