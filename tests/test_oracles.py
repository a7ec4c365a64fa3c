"""Behaviour against oracles the code under test has no part in (issue 21), in every configuration it runs in.

bf16 RMSNorm element by element against the rounding order of docs/MODEL.md §1; rotary tables in bf16 past position
256; every attention path (plain, sdpa, triton) with a KV cache (fewer queries than keys) and with packing, against
float64 attention written out one query at a time; generation with a cache against generation without, on every
path; the sampling filters at their exact boundaries (equal logits, whose probabilities are exact); the learning
rate of every step of a short schedule against values computed by hand; the training loss against cross_entropy on
labels shifted here, and a packed loss against the samples' losses computed one at a time; and what --viz draws on
a multi-patch image whose answer is known. benchmarks/mutants.py checks that these tests fail when the code is wrong.
"""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import interleave
import sample
import train
from helpers import golden_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ["plain", "sdpa", "triton"]


def golden(variant):
    return load_file(golden_path(variant, "golden.safetensors"))


def tiny_model(impl="sdpa"):
    """The untied golden checkpoint: 4 query heads share 2 kv heads (GQA), float32."""
    return interleave.load(golden_path("untied", "hf"), attn=impl)


# ---- RMSNorm in bf16: normalise in float32, round to bf16, THEN multiply by the weight (§1)

def test_rmsnorm_in_bf16_rounds_before_the_weight_as_documented():
    g = torch.Generator().manual_seed(0)
    dim = 256
    x = (torch.randn(64, dim, generator=g) * 3).bfloat16()
    weight = (torch.rand(dim, generator=g) * 2 + 0.3).bfloat16()
    norm = interleave.RMSNorm(dim, 1e-6).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(weight)
        got = norm(x)
    # The oracle normalises in float64. The code's float32 result can round to the other bf16 neighbour only where
    # the exact value lies within float32 error of a bf16 rounding midpoint: there either neighbour is accepted.
    x64 = x.double()
    normed = x64 / (x64.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    low = (normed * (1 - 2 ** -18)).bfloat16()
    high = (normed * (1 + 2 ** -18)).bfloat16()
    # A product of two bf16 numbers is exact in float64: one rounding, to bf16.
    expect_low = (low.double() * weight.double()).float().bfloat16()
    expect_high = (high.double() * weight.double()).float().bfloat16()
    assert got.dtype == torch.bfloat16
    ambiguous = int((expect_low != expect_high).sum())
    assert ambiguous < 100, ambiguous   # a few near-ties among 16384
    wrong = (got != expect_low) & (got != expect_high)
    assert not wrong.any(), f"{int(wrong.sum())} of {got.numel()} elements rounded in another order"


def test_rotary_tables_in_bf16_keep_positions_past_256_exact():
    positions = torch.arange(1200)[None]   # (1, T)
    head_dim = 64
    cos, sin = interleave.rotary_tables(positions, head_dim, 1e6, torch.bfloat16)   # (1, 1, T, D)
    # float64 angles of the integer positions; the rotate-half layout repeats the D/2 frequencies
    freq = 1e6 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(1200, dtype=torch.float64)[:, None] * freq   # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)
    # rounding to bf16 moves a value in [-1, 1] by at most 2^-9; float32 angles add far less than that
    assert (cos[0, 0].double() - angles.cos()).abs().max() <= 2 ** -8
    assert (sin[0, 0].double() - angles.sin()).abs().max() <= 2 ** -8


# ---- Attention: every path, with a cache (Tq < Tk) and with packing, against float64

def attention_oracle(q, k, v, cu_seqlens=None):
    """float64 causal attention one query at a time. The Tq queries are the last Tq of the Tk positions; query i
    sees key j iff j <= Tk - Tq + i and j is in the query's sample (cu_seqlens: the samples' boundaries)."""
    b, h, tq, d = q.shape
    hkv = k.shape[1]
    tk = k.shape[2]
    bounds = [0, tk] if cu_seqlens is None else cu_seqlens.tolist()
    sample_of = [s for s in range(len(bounds) - 1) for _ in range(bounds[s], bounds[s + 1])]
    out = torch.zeros(b, h, tq, d, dtype=torch.float64)
    for row in range(b):
        for head in range(h):
            kv = head // (h // hkv)
            for i in range(tq):
                position = tk - tq + i
                keys = [j for j in range(position + 1) if sample_of[j] == sample_of[position]]
                scores = k[row, kv, keys].double() @ q[row, head, i].double() / math.sqrt(d)
                out[row, head, i] = scores.softmax(0) @ v[row, kv, keys].double()
    return out


# (batch, heads, kv heads, queries, keys, the packed samples' boundaries)
ATTENTION_CASES = {
    "prefill-after-a-cache": (2, 4, 2, 3, 7, None),
    "one-new-token": (1, 4, 1, 1, 9, None),
    "no-cache": (2, 2, 2, 6, 6, None),
    "packed": (1, 4, 2, 10, 10, [0, 3, 4, 10]),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
@pytest.mark.parametrize("impl", IMPLS)
def test_every_attention_path_with_a_cache_and_with_packing_matches_float64(impl, case):
    b, h, hkv, tq, tk, bounds = ATTENTION_CASES[case]
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, h, tq, 16, generator=g)
    k = torch.randn(b, hkv, tk, 16, generator=g)
    v = torch.randn(b, hkv, tk, 16, generator=g)
    cu_seqlens = None if bounds is None else torch.tensor(bounds, dtype=torch.int32)
    got = interleave.attention(q, k, v, True, impl, cu_seqlens=cu_seqlens)
    want = attention_oracle(q, k, v, cu_seqlens)
    assert got.shape == want.shape
    assert (got.double() - want).abs().max() <= 1e-5


def recorded_generation(model, monkeypatch, ids, pixels, use_cache):
    """Greedy tokens and the logits each was picked from, (steps, B, vocab)."""
    logits = []
    pick = interleave.next_token

    def recording_next_token(step_logits, *args):
        logits.append(step_logits.clone())
        return pick(step_logits, *args)
    with monkeypatch.context() as patch:
        patch.setattr(interleave, "next_token", recording_next_token)
        tokens = model.generate(ids, pixels, max_new_tokens=5, stop_ids=(), use_cache=use_cache)
    return tokens, torch.stack(logits)


@pytest.mark.parametrize("impl", IMPLS)
def test_generation_with_a_cache_matches_generation_without_on_every_path(impl, monkeypatch):
    model = tiny_model(impl)
    g = golden("untied")
    ids = g["two_images.input_ids"]
    pixels = g["two_images.pixel_values"]
    # a prompt with two images, then a batch of two rows of text
    text = torch.randint(0, 290, (2, 11), generator=torch.Generator().manual_seed(2))
    for prompt, images in ((ids, pixels), (text, None)):
        cached, cached_logits = recorded_generation(model, monkeypatch, prompt, images, use_cache=True)
        full, full_logits = recorded_generation(model, monkeypatch, prompt, images, use_cache=False)
        assert cached.tolist() == full.tolist()
        assert (cached_logits - full_logits).abs().max() <= 1e-4


# ---- Sampling filters at their exact boundaries

def draws(logits, n=400, **settings):
    """The set of tokens n draws of next_token pick, from a seeded generator."""
    g = torch.Generator().manual_seed(3)
    sequence = torch.zeros(1, 1, dtype=torch.long)
    return {interleave.next_token(logits, sequence, generator=g, **settings).item() for _ in range(n)}


@pytest.mark.parametrize("tokens, top_p, kept", [
    (4, 0.75, 3),   # cumulative 0.25 of the least likely equals 1 - top_p exactly: it goes
    (8, 0.5, 4),    # 1/8 each: the four least likely total exactly 0.5
    (4, 0.7, 3),    # off the boundary: the same three
])
def test_top_p_drops_tokens_whose_total_is_exactly_one_minus_top_p(tokens, top_p, kept):
    # Equal logits: every probability is exactly 1/tokens, so every cumulative sum is exact too. A token stays
    # iff the tokens more likely than it total less than top_p (so the one that crosses top_p stays).
    logits = torch.zeros(1, tokens)
    assert len(draws(logits, temperature=1.0, top_p=top_p)) == kept


def test_top_k_keeps_ties_with_the_kth_logit():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]])
    assert draws(logits, temperature=1.0, top_k=2) == {1, 2, 3}
    assert draws(logits, temperature=1.0, top_k=1) == {1}


def test_sampling_draws_from_the_documented_distribution(monkeypatch):
    """The probabilities handed to the draw: penalty, then temperature, then top-k, then top-p (§3's order)."""
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.5, -3.0, 0.0]])
    sequence = torch.tensor([[3, 4, 999]])   # 999: an image slot, never penalised
    handed = []
    multinomial = torch.multinomial

    def recording_multinomial(probs, n, generator=None):
        handed.append(probs.clone())
        return multinomial(probs, n, generator=generator)
    monkeypatch.setattr(torch, "multinomial", recording_multinomial)
    interleave.next_token(logits, sequence, temperature=0.5, top_k=4, top_p=0.9, repetition_penalty=1.3,
                          image_token_id=999)
    # by hand: tokens 3 and 4 were seen: 1.5 / 1.3 and -3.0 * 1.3; then / 0.5
    scaled = torch.tensor([2.0, -1.0, 0.5, 1.5 / 1.3, -3.9, 0.0], dtype=torch.float64) / 0.5
    keep = torch.tensor([True, False, True, True, False, True])       # top 4: tokens 3, 0, 2, 5
    probs = scaled.masked_fill(~keep, -math.inf).softmax(0)
    order = probs.argsort(descending=True)
    before = probs[order].cumsum(0) - probs[order]                   # what the more likely tokens total
    nucleus = torch.zeros(6, dtype=torch.bool)
    nucleus[order[before < 0.9]] = True
    want = scaled.masked_fill(~(keep & nucleus), -math.inf).softmax(0)
    assert len(handed) == 1
    assert (handed[0][0].double() - want).abs().max() <= 1e-6


# ---- The learning rate of every step: warmup, cosine, floor

def test_learning_rate_of_every_step_against_hand_computed_values():
    cfg = train.Config(steps=6, warmup=2, lr=1e-3)
    # warmup: 1/2 and 2/2 of --lr; then 0.1 + 0.45 (1 + cos(pi p)) of it, p = 0, 1/4, 1/2, 3/4 (cos(pi/4) = 0.7071)
    by_hand = [0.5e-3, 1e-3, 1e-3, 0.8681981e-3, 0.55e-3, 0.2318019e-3]
    assert [train.get_lr(step, cfg) for step in range(6)] == pytest.approx(by_hand, rel=1e-6)
    # past the schedule's end it stays at the floor, a tenth of --lr
    assert [train.get_lr(step, cfg) for step in (6, 7, 20)] == pytest.approx([1e-4] * 3, rel=1e-9)
    # no warmup: the first step is already at --lr
    assert train.get_lr(0, train.Config(steps=4, warmup=0, lr=2e-3)) == pytest.approx(2e-3)


# ---- The training loss against cross_entropy on labels shifted here

def test_training_loss_is_cross_entropy_of_each_position_predicting_the_next_label():
    model = tiny_model()
    goldens = golden("untied")
    ids = goldens["two_images.input_ids"]   # (1, T)
    pixels = goldens["two_images.pixel_values"]
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 290, ids.shape[1:], generator=g)
    labels[torch.rand(labels.shape, generator=g) < 0.3] = interleave.IGNORE
    labels[ids[0] == model.config.image_token_id] = interleave.IGNORE
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        loss = train.WithLoss(model)(ids, labels, pixels, [None, None], positions)
        logits = model(ids, pixels)[0]   # (T, vocab)
    # position t predicts label t + 1; the loss is summed (forward_backward divides by the count)
    want = F.cross_entropy(logits[:-1], labels[1:], ignore_index=interleave.IGNORE, reduction="sum")
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_packed_loss_is_the_sum_of_its_samples_losses_alone(impl):
    model = tiny_model(impl)
    g = torch.Generator().manual_seed(5)
    samples = []
    alone = 0.0
    for n in (7, 4, 9):
        ids = torch.randint(0, 290, (n,), generator=g)
        labels = torch.randint(0, 290, (n,), generator=g)
        samples.append(interleave.Sample(ids, labels, None, []))
        with torch.no_grad():
            logits = model(ids[None])[0]
        alone += F.cross_entropy(logits[:-1], labels[1:], reduction="sum").item()
    pack, = interleave.pack_samples(samples, 32, verbose=False)
    # §5: longest first, positions restarting at 0 in each sample. (Rotary attention sees only the distance
    # between positions, so positions that ran on would leave the loss as it is: this line is their only check.)
    assert pack.position_ids.tolist() == [*range(9), *range(7), *range(4)]
    assert pack.cu_seqlens.tolist() == [0, 9, 16, 20]
    with torch.no_grad():
        packed = train.WithLoss(model)(pack.input_ids[None], pack.labels, None, [], pack.position_ids[None],
                                       pack.cu_seqlens)
    assert packed.item() == pytest.approx(alone, rel=1e-5)


# ---- What --viz draws: the tile grid of a multi-patch image, its image_newline column left out

def test_viz_draws_the_tile_grid_without_the_newline_column(tmp_path):
    config = interleave.read_config(os.path.join(ROOT, "models", "m4-tiny"))   # 64-pixel tiles of 4 x 4 patches
    size = (128, 64)   # fits the 128 x 64 canvas exactly: 1 x 2 tiles, a 4 x 8 grid, nothing unpadded
    assert interleave.multipatch_layout(size, config)[1:] == (1, 2, (0, 4, 0, 8))
    slots = 16 + 4 * 9   # the base view, then 4 rows of 8 patches and an image_newline each
    assert interleave.image_slots(config, size) == slots
    sample_in = interleave.Sample(torch.tensor([5] + [config.image_token_id] * slots + [6]), None, None, [size])
    weights = torch.full((slots + 2,), 0.01)
    grid = weights[1 + 16:1 + slots].view(4, 9)   # a view: (row, column), column 8 the newlines
    grid[:, 8] = 0.3                              # the newlines get much of the attention
    grid[1, 5] = 0.5                              # and one patch the most
    maps, shares = sample.attention_maps(sample_in, weights, config)
    expected = torch.full((4, 8), 0.01)
    expected[1, 5] = 0.5
    assert torch.equal(maps[0], expected)
    assert shares[0] == pytest.approx(float(weights[1:1 + slots].sum()))
    # drawn: the grey picture enlarged 2x to 256 x 128, centred in its 256-pixel square, 32 pixels a patch
    picture = Image.new("RGB", size, (128, 128, 128))
    out = str(tmp_path / "viz.png")
    sample.draw_attention(out, [picture], ["picture"], sample_in, weights, config, lambda message: None)
    sheet = np.asarray(Image.open(out).convert("RGB")).astype(int)
    top = 8 + (256 - 128) // 2   # no caption: the header is 8 pixels
    for row in range(4):
        for column in range(8):
            red, green, _ = sheet[top + 32 * row + 16, 32 * column + 16]
            if (row, column) == (1, 5):
                assert red >= 190 and green < 100, (row, column, red, green)
            else:
                assert red == green == 128, (row, column, red, green)   # the picture's grey: no attention drawn
    # the square's right edge is the picture's last column of patches, still grey: no newline column there
    edge = sheet[top:top + 128, 250:256]
    assert (edge == 128).all()
