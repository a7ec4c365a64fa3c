"""Golden parity with the reference implementation (transformers), at float32 on CPU.

The goldens and the tiny checkpoints they come from are made by tests/goldens/make_goldens.py with the reference
installed; these tests need only the committed files. Bound: max|diff| <= 1e-5 + 2e-6 * max|ref|.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import interleave
from helpers import GOLDENS, golden_path, max_diff

REFERENCE_SLOT_ID = 300          # the tiny checkpoints' image_token_index
LAYOUTS = [("tied", "hf"), ("tied", "hf_new"), ("tied", "original"), ("untied", "hf"), ("untied", "hf_new"),
           ("untied", "original"), ("layer2", "hf"), ("layer2", "hf_new")]
CASES = ["two_images", "batch2", "text_only"]


def golden(variant):
    return load_file(golden_path(variant, "golden.safetensors"))


def model_inputs(model, g, case):
    """The golden input_ids with the model's own slot id (the original layout uses 151646), and the pixels."""
    ids = g[f"{case}.input_ids"].clone()
    ids[ids == REFERENCE_SLOT_ID] = model.config.image_token_id
    return ids, g.get(f"{case}.pixel_values")


def assert_close(ours, ref, what):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}"
    diff, bound = max_diff(ours, ref)
    assert diff <= bound, f"{what}: max|diff| {diff:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("variant, layout", LAYOUTS)
@pytest.mark.parametrize("attn", ["plain", "sdpa"])
def test_logits_and_features_match_reference(variant, layout, attn):
    g = golden(variant)
    model = interleave.load(os.path.join(GOLDENS, variant, layout), attn=attn)
    assert model.config.image_token_id == (interleave.IMAGE_SLOT_ID if layout == "original" else REFERENCE_SLOT_ID)
    with torch.no_grad():
        for case in CASES:
            ids, pixels = model_inputs(model, g, case)
            if pixels is not None:
                assert_close(model.vision(pixels), g[f"{case}.vision_features"], f"{case} vision features")
                per_image = model.encode_image(pixels).view(pixels.shape[0], -1, model.config.text.hidden)
                assert_close(per_image, g[f"{case}.image_features"], f"{case} projector output")
            assert_close(model(ids, pixels), g[f"{case}.logits"], f"{case} logits")


def test_triton_attention_matches_reference():
    """The kernel path on CPU runs under Triton's interpreter: one case and a short generation, to keep it fast."""
    pytest.importorskip("triton")
    g = golden("untied")
    model = interleave.load(os.path.join(GOLDENS, "untied", "hf"), attn="triton")
    ids, pixels = model_inputs(model, g, "two_images")
    with torch.no_grad():
        assert_close(model(ids, pixels), g["two_images.logits"], "two_images logits (triton)")
    cached = model.generate(ids, pixels, max_new_tokens=8, stop_ids=())   # cached prefill and one-token decodes
    assert cached.tolist() == g["two_images.greedy"].tolist()


@pytest.mark.parametrize("variant, layout", [("tied", "original"), ("untied", "hf"), ("layer2", "hf")])
def test_greedy_generation_matches_reference_and_cache(variant, layout):
    g = golden(variant)
    model = interleave.load(os.path.join(GOLDENS, variant, layout))
    for case in ["two_images", "text_only"]:
        ids, pixels = model_inputs(model, g, case)
        cached = model.generate(ids, pixels, max_new_tokens=8, stop_ids=())
        recomputed = model.generate(ids, pixels, max_new_tokens=8, stop_ids=(), use_cache=False)
        assert cached.tolist() == recomputed.tolist(), f"{case}: KV cache changes greedy decoding"
        assert cached.tolist() == g[f"{case}.greedy"].tolist(), f"{case}: greedy tokens differ from the reference"


def generate_recorded(model, monkeypatch, ids, pixels, cuda_graph):
    """generate's greedy tokens, the logits it picked each token from (steps, B, vocab), and whether its decode
    step was the fixed-shape one (the KV cache was given a tensor position)."""
    logits, tensor_start = [], []
    pick, update = interleave.next_token, interleave.KVCache.update

    def recording_next_token(step_logits, *args):
        logits.append(step_logits)
        return pick(step_logits, *args)

    def recording_update(cache, layer, start, k, v):
        tensor_start.append(torch.is_tensor(start))
        return update(cache, layer, start, k, v)
    monkeypatch.setattr(interleave, "next_token", recording_next_token)
    monkeypatch.setattr(interleave.KVCache, "update", recording_update)
    tokens = model.generate(ids, pixels, max_new_tokens=8, stop_ids=(), cuda_graph=cuda_graph)
    monkeypatch.undo()
    return tokens, torch.stack(logits), any(tensor_start)


@pytest.mark.parametrize("case, rows", [("two_images", 1), ("batch2", 2), ("text_only", 1), ("text_only", 2)])
def test_fixed_shape_decode_step_matches_the_dynamic_one(monkeypatch, case, rows):
    """The decode step that a CUDA graph captures on a GPU (fixed shapes: it writes the cache at a position held in a
    tensor and attends to the whole cache, masked past that position) runs eagerly on the CPU with cuda_graph=True.
    It must give the dynamic-shape step's greedy tokens and, at every step, its logits within the parity bound."""
    g = golden("untied")   # GQA: 4 query heads share 2 kv heads
    model = interleave.load(os.path.join(GOLDENS, "untied", "hf"))
    ids, pixels = model_inputs(model, g, case)
    if rows > ids.shape[0]:
        ids = torch.cat([ids, ids.flip(1)])   # a second, different text-only row
    fixed, fixed_logits, fixed_used = generate_recorded(model, monkeypatch, ids, pixels, cuda_graph=True)
    dynamic, dynamic_logits, default_fixed = generate_recorded(model, monkeypatch, ids, pixels, cuda_graph=None)
    assert fixed_used and not default_fixed, "cuda_graph=True must use the fixed-shape step; the CPU default not"
    assert fixed.tolist() == dynamic.tolist(), f"{case} x{rows}: the fixed-shape step changes greedy decoding"
    assert_close(fixed_logits, dynamic_logits, f"{case} x{rows}: logits of the fixed-shape step")


def test_feature_layer_runs_no_layer_beyond_it():
    model = interleave.load(os.path.join(GOLDENS, "layer2", "hf"))
    assert model.config.vision.feature_layer == -2 and len(model.vision.layers) == 3

    def forbidden(*args):
        raise AssertionError("the last vision layer ran although feature_layer = -2")
    model.vision.layers[-1].forward = forbidden
    with torch.no_grad():
        model.vision(golden("layer2")["two_images.pixel_values"])


# ---- The parity bound is tight enough to catch the classic bugs: each wrong variant must fail it.

def wrong_post_layernorm(model, pixels):
    return model.projector(model.vision.post_layernorm(model.vision(pixels)))


def wrong_tanh_projector(model, pixels):
    p = model.projector
    return p.linear_2(F.gelu(p.linear_1(model.vision(pixels)), approximate="tanh"))


def wrong_layernorm_eps(model, pixels):
    for module in model.vision.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 1e-5
    return model.projector(model.vision(pixels))


@pytest.mark.parametrize("wrong", [wrong_post_layernorm, wrong_tanh_projector, wrong_layernorm_eps])
def test_wrong_variants_fail_the_bound(wrong):
    g = golden("untied")
    model = interleave.load(os.path.join(GOLDENS, "untied", "hf"))
    pixels, ref = g["two_images.pixel_values"], g["two_images.image_features"]
    with torch.no_grad():
        right = model.projector(model.vision(pixels))
        assert max_diff(right, ref)[0] <= max_diff(right, ref)[1]       # the correct model passes ...
        diff, bound = max_diff(wrong(model, pixels), ref)
    assert diff > 10 * bound, f"{wrong.__name__}: max|diff| {diff:.3g} is not far past the bound {bound:.3g}"
