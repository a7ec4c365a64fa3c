"""Make the golden reference files for the LLaVA-NeXT-Interleave reimplementation.

What it makes
-------------
Tiny, randomly initialised ``LlavaForConditionalGeneration`` models (Hugging Face transformers is the
reference), saved in the checkpoint layouts the model under test must load, plus the reference's outputs
on fixed inputs.  Everything is float32, computed on CPU with ``model.eval()``.

How to run (from the repository root, with the reference installed; CI does not need it)::

    /tmp/refvenv/bin/python tests/goldens/make_goldens.py

The script is deterministic (fixed seeds, one CPU thread).  It builds every variant in a temporary folder
under ``tests/goldens/`` and then swaps each ``tests/goldens/<variant>/`` folder in with a rename.  After
writing, it checks its own output: each ``hf/`` and ``hf_new/`` folder is loaded back with
``LlavaForConditionalGeneration.from_pretrained`` and must give bit-identical logits; each ``original/``
folder is renamed back to the reference's key names and compared tensor for tensor, bit for bit.

Tiny shapes (the same in every variant)
---------------------------------------
* Vision tower (SigLIP): image 120, patch 14 -> 8x8 = 64 patches per image (the last 8 pixel rows and
  columns are ignored, as 384 = 27*14 + 6 in the release), hidden 48, 2 heads of dim 24, MLP 96,
  3 encoder layers, LayerNorm eps 1e-6, gelu_pytorch_tanh, no pooling head (``vision_use_head`` false,
  no ``head.*`` keys).  ``post_layernorm`` is stored but NOT applied to the image features.
* Projector: Linear(48 -> 64, bias) -> GELU (exact erf) -> Linear(64 -> 64, bias).
* Text model (Qwen2): hidden 64, 4 query heads, 2 kv heads (GQA), head dim 16, MLP 96, 2 layers,
  RMSNorm eps 1e-6, rope theta 1e6, vocab 320, max positions 4096.
* LLaVA: image_token_index 300 (inside the vocab), vision_feature_select_strategy "full".

Every parameter is re-randomised after construction (the reference init zeroes biases and sets norms to 1,
which would hide bias/norm bugs).  The patch and position embeddings are scaled down so that the vision
residual stream entering the first LayerNorm has a per-token std of a few 1e-3: there LayerNorm eps 1e-6
vs 1e-5 matters.  The projector's first linear is scaled so its pre-activations are O(1), where the exact
and tanh forms of GELU differ.  The script measures, with the reference, how far three deliberately wrong
models land from the right one and refuses to write anything unless each misses the tolerance used by the
tests, max|diff| <= 1e-5 + 2e-6 * max|ref|, by at least 10x:
  (a) post_layernorm applied to the image features,
  (b) tanh-approximate GELU in the projector,
  (c) LayerNorm eps 1e-5 in the vision tower.

Variants (one folder each)
--------------------------
* ``tied/``   tie_word_embeddings true (in text_config and at the top level); the files hold no lm_head.
* ``untied/`` tie_word_embeddings false; lm_head stored.
* ``layer2/`` like untied, but vision_feature_layer -2: the features are hidden_states[-2] of the tower,
  where hidden_states = (embeddings, layer_1, ..., layer_N), i.e. the output of encoder layer N-1 = 2.
  Only the hf/ and hf_new/ layouts.
Each variant has its own weights (its own seed).

Files in ``tests/goldens/<variant>/``
-------------------------------------
* ``hf/config.json``, ``hf/model.safetensors``: the hub layout of llava-hf/llava-interleave-qwen-0.5b-hf.
  Keys ``language_model.model.*``, ``language_model.lm_head.weight`` (untied only),
  ``vision_tower.vision_model.{embeddings,encoder,post_layernorm}.*``,
  ``multi_modal_projector.linear_{1,2}.{weight,bias}``.  The config is written by hand in the hub's style:
  model_type "llava", text_config {model_type "qwen2", rope_theta at the text_config's top level, no
  head_dim}, vision_config {model_type "siglip_vision_model"}, no ``multimodal_projector_bias`` key (the
  hub file has none; it defaults to true).
* ``hf_new/``: what transformers 5 writes with ``save_pretrained`` (its own config.json and
  generation_config.json kept as written; its config has ``rope_parameters`` instead of ``rope_theta``,
  and ``head_dim``).  transformers 5 has two save formats and both occur in the wild, so:
    - ``tied/hf_new``: the default ``save_pretrained(d)`` (``save_original_format=True``).  It writes
      ``language_model.model.*``, ``multi_modal_projector.*`` and ``vision_tower.{embeddings,encoder,
      post_layernorm}.*`` -- note: the tower WITHOUT ``vision_model.``, a hybrid of the two layouts.
    - ``untied/hf_new`` and ``layer2/hf_new``: ``save_pretrained(d, save_original_format=False)``, the
      native transformers 5 names ``model.language_model.*``, ``model.vision_tower.{embeddings,encoder,
      post_layernorm}.*`` (no ``vision_model.``), ``model.multi_modal_projector.*``, ``lm_head.weight``.
      ``untied/hf_new`` is sharded: ``model.safetensors.index.json`` + ``model-0000k-of-0000n.safetensors``.
  ``meta.json`` records which one each folder is.
* ``original/`` (tied and untied only): the lmms-lab layout of lmms-lab/llava-next-interleave-qwen-0.5b.
  ``config.json`` has model_type "llava_qwen", the Qwen2 fields at the top level, the ``mm_*`` fields of the
  release and, because this tiny checkpoint cannot be described by a tower id, a ``vision_config`` block
  with the tiny SigLIP shape.  ``model.safetensors`` keys:
  ``model.embed_tokens.weight``, ``model.layers.{i}.*``, ``model.norm.weight``, ``lm_head.weight``
  (untied only), ``model.vision_tower.vision_tower.vision_model.{embeddings,encoder,post_layernorm}.*``,
  ``model.mm_projector.0.{weight,bias}``, ``model.mm_projector.2.{weight,bias}``, ``model.image_newline``
  (shape [64], random; plain images do not use it).  ``mm_vision_select_layer`` is -2 as in the release,
  whose SigLIP wrapper ignores it: the features are the LAST layer's (the same as hf/ with layer -1).
  The original release has no image token: the model under test uses slot id 151646 there instead of 300
  (outside this tiny vocab of 320); the tests swap the ids in ``input_ids`` themselves.
* ``golden.safetensors``: the reference's outputs, float32 unless said otherwise, per case:
    ``<case>.input_ids``        int64 (B, T); image slots hold 300.
    ``<case>.pixel_values``     (n_images, 3, 120, 120), uniform in [-1, 1], images in slot order
                                (absent for text_only).
    ``<case>.vision_features``  (n_images, 64, 48): the tower's selected hidden states, before the projector
                                (absent for text_only).
    ``<case>.image_features``   (n_images, 64, 64): projector output (absent for text_only).
    ``<case>.logits``           (B, T, 320): one forward pass, no cache, no attention mask (no padding).
    ``<case>.greedy``           int64 (B, 8), two_images and text_only only: the 8 new tokens of
                                ``generate(do_sample=False, max_new_tokens=8)`` with the KV cache, eos
                                disabled (eos_token_id None) so generation never stops early.
  Cases (the same inputs in every variant): ``two_images`` (B=1, T=150: 5 text, 64 slots, 7 text,
  64 slots, 10 text), ``batch2`` (B=2, T=94, one image per row: row 0 = 6 text, 64 slots, 24 text;
  row 1 = 25 text, 64 slots, 5 text; pixel_values = [row 0's image, row 1's image]), ``text_only``
  (B=1, T=20).  Text ids are uniform in [0, 300), so never the image token 300.
* ``meta.json``: reference versions, seeds, the wrong-variant margins, the layouts written, the
  image_token_index, the greedy settings, the smallest top-1/top-2 logit gap met while decoding, and the
  float32 noise floor: how much of the tolerance the golden's own round-off uses (golden vs the same model
  in float64, and vs the reference's eager attention in float32), in units of the bound.

Quirks of the reference worth knowing (transformers 5.x)
--------------------------------------------------------
* The image slots are first looked up in embed_tokens (300 is a valid row) and then overwritten with the
  projected features by ``masked_scatter``, in order; the slot rows of embed_tokens never matter.
* The tower's hidden_states are (embeddings, layer_1, ..., layer_N); hidden_states[-1] is the last layer
  BEFORE post_layernorm (``last_hidden_state`` is after it and is not used by LLaVA).
* If greedy decoding emits the image token, the cached generate() embeds it as a plain token, but a
  no-cache forward over the same sequence raises (slot count != feature count); the seeds avoid this.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import transformers
from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

HERE = Path(__file__).resolve().parent

IMAGE_TOKEN = 300
ORIGINAL_IMAGE_SLOT = 151646
VOCAB = 320
N_PATCH = 64  # (120 // 14) ** 2
INPUT_SEED = 1234
VARIANTS = {
    # name: (tie_word_embeddings, vision_feature_layer, weight seed, layouts, hf_new save kwargs)
    # (seeds picked among 1..60 for varied greedy tokens, clear argmax gaps and low float32 round-off)
    "tied": (True, -1, 2, ("hf", "hf_new", "original"), {}),
    "untied": (False, -1, 26, ("hf", "hf_new", "original"),
               {"save_original_format": False, "max_shard_size": "300KB"}),
    "layer2": (False, -2, 57, ("hf", "hf_new"), {"save_original_format": False}),
}
GREEDY_NEW_TOKENS = 8
REQUIRED_MARGIN = 10.0

VISION = dict(image_size=120, patch_size=14, hidden_size=48, num_attention_heads=2, intermediate_size=96,
              num_hidden_layers=3, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", vision_use_head=False)
TEXT = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
            num_hidden_layers=2, rms_norm_eps=1e-6, rope_theta=1e6, vocab_size=VOCAB,
            max_position_embeddings=4096, hidden_act="silu")


# ----------------------------------------------------------------------------------------------- model
def build_config(tie: bool, feature_layer: int) -> LlavaConfig:
    vc = SiglipVisionConfig(**VISION)
    tc = Qwen2Config(**TEXT, head_dim=16, tie_word_embeddings=tie)
    return LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN,
                       projector_hidden_act="gelu", vision_feature_layer=feature_layer,
                       vision_feature_select_strategy="full", multimodal_projector_bias=True,
                       image_seq_length=N_PATCH, tie_word_embeddings=tie)


def init_std(name: str, p: torch.Tensor) -> tuple[float, float]:
    """(mean, std) of the fresh normal draw for parameter `name`.

    The scales were tuned with the reference (see the margins and noise floor printed by this script):
    the vision stream starts small (LayerNorm eps visible), the projector's pre-activations are O(1)
    (tanh vs erf GELU visible), and the text model is kept well conditioned (float32 round-off far below
    the tests' tolerance) while greedy decoding still produces varied tokens.
    """
    is_norm = ("layer_norm" in name or "layernorm" in name or name.endswith("norm.weight"))
    if "patch_embedding.weight" in name:
        return 0.0, 2e-4      # conv fan-in 588, pixels ~U[-1,1] -> patch tokens std ~3e-3
    if "patch_embedding.bias" in name:
        return 0.0, 1e-3
    if "position_embedding" in name:
        return 0.0, 2e-3
    if is_norm and name.endswith("weight"):
        return 1.0, 0.1
    if "multi_modal_projector.linear_1.weight" in name:
        return 0.0, 0.3       # pre-activation std ~2: tanh vs erf GELU must show
    if "multi_modal_projector.linear_2.weight" in name:
        return 0.0, 0.15
    if "language_model" in name or name.startswith("lm_head"):
        if name.endswith("bias"):
            return 0.0, 0.05
        if "embed_tokens" in name:
            return 0.0, 0.2
        if "q_proj" in name or "k_proj" in name:
            return 0.0, 0.2   # sharper attention = more varied greedy tokens, but more float32 round-off
        if ".mlp." in name:
            return 0.0, 0.1
        return 0.0, 0.15
    if name.endswith("bias"):
        return 0.0, 0.1
    return 0.0, 0.1


@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # a tied lm_head is the same tensor as embed_tokens: seen once
        mean, std = init_std(name, p)
        p.copy_(mean + std * torch.randn(p.shape, generator=g))


def make_model(tie: bool, feature_layer: int, seed: int) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(tie, feature_layer)).float().eval()
    randomize(model, seed)
    if tie:
        assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    model.generation_config.bos_token_id = None
    return model


# ---------------------------------------------------------------------------------------------- inputs
def make_inputs() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(INPUT_SEED)

    def text(n: int) -> torch.Tensor:
        ids = torch.randint(0, IMAGE_TOKEN, (n,), generator=g)  # [0, 300): never the image token
        assert not (ids == IMAGE_TOKEN).any()
        return ids

    def slots() -> torch.Tensor:
        return torch.full((N_PATCH,), IMAGE_TOKEN, dtype=torch.long)

    def pixels(n: int) -> torch.Tensor:
        return torch.rand((n, 3, 120, 120), generator=g) * 2 - 1

    two = torch.cat([text(5), slots(), text(7), slots(), text(10)])[None]
    row0 = torch.cat([text(6), slots(), text(24)])
    row1 = torch.cat([text(25), slots(), text(5)])
    cases = {
        "two_images": {"input_ids": two, "pixel_values": pixels(2)},
        "batch2": {"input_ids": torch.stack([row0, row1]), "pixel_values": pixels(2)},
        "text_only": {"input_ids": text(20)[None]},
    }
    for c in cases.values():
        assert c["input_ids"].dtype == torch.int64
        n_img = int((c["input_ids"] == IMAGE_TOKEN).sum()) // N_PATCH
        assert n_img == (c["pixel_values"].shape[0] if "pixel_values" in c else 0)
    return cases


# -------------------------------------------------------------------------------------------- outputs
@torch.no_grad()
def vision_and_image_features(model, pixel_values):
    feats = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    vf = feats[model.config.vision_feature_layer]
    imf = model.model.multi_modal_projector(vf)
    # the reference's own path must agree exactly
    own = torch.stack(model.model.get_image_features(pixel_values, return_dict=True).pooler_output)
    assert torch.equal(own, imf), "reference get_image_features disagrees with tower+projector"
    return vf, imf


@torch.no_grad()
def logits_of(model, case):
    return model(input_ids=case["input_ids"], pixel_values=case.get("pixel_values"), use_cache=False).logits


@torch.no_grad()
def greedy(model, case):
    ids = case["input_ids"]
    extra = {"pixel_values": case["pixel_values"]} if "pixel_values" in case else {}
    out = model.generate(input_ids=ids, **extra,
                         attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=GREEDY_NEW_TOKENS, min_new_tokens=GREEDY_NEW_TOKENS,
                         eos_token_id=None, pad_token_id=None, use_cache=True)
    new = out[:, ids.shape[1]:]
    assert new.shape == (ids.shape[0], GREEDY_NEW_TOKENS), new.shape
    # (the reference's own no-cache forward refuses a sequence with more image slots than images)
    assert not (new == IMAGE_TOKEN).any(), "greedy produced the image token; pick other seeds"
    # cross-check against the no-cache forward and record how clear-cut each argmax was
    full = torch.cat([ids, new], 1)
    lg = model(input_ids=full, pixel_values=case.get("pixel_values"), use_cache=False).logits
    steps = lg[:, ids.shape[1] - 1: -1]
    assert torch.equal(steps.argmax(-1), new), "greedy with cache disagrees with no-cache argmax"
    top2 = steps.topk(2, dim=-1).values
    gap = float((top2[..., 0] - top2[..., 1]).min())
    return new, gap


# ------------------------------------------------------------------------------ wrong-variant margins
class _PostLNThenProjector(nn.Module):
    def __init__(self, post_ln, projector):
        super().__init__()
        self.post_ln, self.projector = post_ln, projector

    def forward(self, x):
        return self.projector(self.post_ln(x))


@torch.no_grad()
def wrong_variant_margins(model, cases) -> dict:
    """max|wrong - right| over the projector output (and the logits), in units of the tests' bound."""
    lm = model.model
    pv = torch.cat([cases["two_images"]["pixel_values"], cases["batch2"]["pixel_values"]])
    _, right = vision_and_image_features(model, pv)
    right_logits = {k: logits_of(model, c) for k, c in cases.items() if "pixel_values" in c}

    def bound(ref):
        return 1e-5 + 2e-6 * float(ref.abs().max())

    def measure(label):
        imf = torch.stack(lm.get_image_features(pv, return_dict=True).pooler_output)
        d = float((imf - right).abs().max())
        res = {"image_features_max_abs_diff": d, "image_features_bound": bound(right),
               "image_features_margin": d / bound(right)}
        worst = min((float((logits_of(model, c) - right_logits[k]).abs().max()) / bound(right_logits[k]))
                    for k, c in cases.items() if "pixel_values" in c)
        res["logits_margin_min_over_cases"] = worst
        print(f"    wrong variant {label}: image_features max|diff| {d:.3e} vs bound {bound(right):.3e}"
              f" -> {d / bound(right):.1f}x; logits (worst case) {worst:.1f}x")
        return res

    out = {}
    # (a) post_layernorm applied to the selected features
    projector = lm.multi_modal_projector
    lm.multi_modal_projector = _PostLNThenProjector(lm.vision_tower.post_layernorm, projector)
    try:
        out["a_post_layernorm_applied"] = measure("(a) post_layernorm applied")
    finally:
        lm.multi_modal_projector = projector
    # (b) tanh GELU in the projector
    act = projector.act
    projector.act = nn.GELU(approximate="tanh")
    try:
        out["b_tanh_gelu_in_projector"] = measure("(b) tanh GELU in projector")
    finally:
        projector.act = act
    # (c) LayerNorm eps 1e-5 in the vision tower
    lns = [m for m in lm.vision_tower.modules() if isinstance(m, nn.LayerNorm)]
    for m in lns:
        m.eps = 1e-5
    try:
        out["c_vision_layernorm_eps_1e-5"] = measure("(c) vision LayerNorm eps 1e-5")
    finally:
        for m in lns:
            m.eps = 1e-6
    # sanity: restored
    _, again = vision_and_image_features(model, pv)
    assert torch.equal(again, right)
    for k, v in out.items():
        if v["image_features_margin"] < REQUIRED_MARGIN:
            raise SystemExit(f"wrong variant {k} only {v['image_features_margin']:.1f}x the bound")
    return out


@torch.no_grad()
def float32_noise_floor(model, cases) -> dict:
    """How much of the tests' tolerance float32 round-off alone uses, in units of the bound:
    the golden (float32, sdpa attention) vs the same model in float64 (the reference still computes its
    rotary cos/sin in float32 there), and vs the reference's own eager attention in float32."""
    m64 = copy.deepcopy(model).double()
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    out = {}
    for cname, case in cases.items():
        c64 = {k: (v.double() if v.is_floating_point() else v) for k, v in case.items()}
        gold = logits_of(model, case)
        b = 1e-5 + 2e-6 * float(gold.abs().max())
        row = {"logits_vs_float64": float((gold.double() - logits_of(m64, c64)).abs().max()) / b,
               "logits_vs_eager_float32": float((gold - logits_of(eager, case)).abs().max()) / b}
        if "pixel_values" in case:
            for i, nm in enumerate(("vision_features", "image_features")):
                g32 = vision_and_image_features(model, case["pixel_values"])[i]
                g64 = vision_and_image_features(m64, c64["pixel_values"])[i]
                bi = 1e-5 + 2e-6 * float(g32.abs().max())
                row[f"{nm}_vs_float64"] = float((g32.double() - g64).abs().max()) / bi
        out[cname] = row
    worst = {k: max(r[k] for r in out.values() if k in r) for k in next(iter(out.values())).keys()}
    print("    float32 noise floor (worst case, fraction of the bound): "
          + ", ".join(f"{k} {v:.2f}" for k, v in worst.items()))
    return {"worst": worst, "per_case": out}


@torch.no_grad()
def vision_stats(model, pixel_values) -> dict:
    """Per-token std of the residual stream entering each vision layer, and projector pre-activation std."""
    hs = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    per_layer = [float(h.std(-1).median()) for h in hs]
    vf = hs[model.config.vision_feature_layer]
    pre = model.model.multi_modal_projector.linear_1(vf)
    return {"median_token_std_of_hidden_states": per_layer, "projector_preactivation_std": float(pre.std())}


# ------------------------------------------------------------------------------------------- layouts
def hf_hub_state_dict(model) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            if model.config.tie_word_embeddings:
                continue
            nk = "language_model.lm_head.weight"
        elif k.startswith("model.language_model."):
            nk = "language_model.model." + k[len("model.language_model."):]
        elif k.startswith("model.vision_tower."):
            nk = "vision_tower.vision_model." + k[len("model.vision_tower."):]
        elif k.startswith("model.multi_modal_projector."):
            nk = k[len("model."):]
        else:
            raise KeyError(k)
        out[nk] = v.detach().clone().contiguous()
    return out


ORIGINAL_RENAMES = [  # (reference state_dict prefix, original-layout prefix)
    ("model.language_model.", "model."),
    ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
    ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
    ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
    ("lm_head.", "lm_head."),
]


def original_state_dict(model, seed: int) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        for src, dst in ORIGINAL_RENAMES:
            if k.startswith(src):
                out[dst + k[len(src):]] = v.detach().clone().contiguous()
                break
        else:
            raise KeyError(k)
    g = torch.Generator().manual_seed(seed + 500)
    out["model.image_newline"] = torch.randn((TEXT["hidden_size"],), generator=g)
    return out


def reverse_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k == "model.image_newline":
            continue
        # longest original prefix first ("model.vision_tower..." / "model.mm_projector..." before "model.")
        for src, dst in sorted(ORIGINAL_RENAMES, key=lambda r: -len(r[1])):
            if k.startswith(dst):
                out[src + k[len(dst):]] = v
                break
        else:
            raise KeyError(k)
    return out


def hf_hub_config(tie: bool, feature_layer: int) -> dict:
    text = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **TEXT,
            "tie_word_embeddings": tie, "torch_dtype": "float32"}
    vision = {"model_type": "siglip_vision_model", **VISION}
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_token_index": IMAGE_TOKEN,
        "model_type": "llava",
        "projector_hidden_act": "gelu",
        "text_config": text,
        "tie_word_embeddings": tie,
        "torch_dtype": "float32",
        "vision_config": vision,
        "vision_feature_layer": feature_layer,
        "vision_feature_select_strategy": "full",
    }


def original_config(tie: bool) -> dict:
    return {
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": "llava_qwen",
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": TEXT["hidden_size"],
        "intermediate_size": TEXT["intermediate_size"],
        "num_attention_heads": TEXT["num_attention_heads"],
        "num_hidden_layers": TEXT["num_hidden_layers"],
        "num_key_value_heads": TEXT["num_key_value_heads"],
        "rms_norm_eps": TEXT["rms_norm_eps"],
        "rope_theta": TEXT["rope_theta"],
        "vocab_size": VOCAB,
        "max_position_embeddings": TEXT["max_position_embeddings"],
        "tie_word_embeddings": tie,
        "use_sliding_window": False,
        "use_cache": True,
        "torch_dtype": "float32",
        "image_aspect_ratio": "anyres",
        "image_grid_pinpoints": [[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]],
        "mm_hidden_size": VISION["hidden_size"],
        "mm_patch_merge_type": "spatial_unpad",
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "google/siglip-so400m-patch14-384",
        "use_mm_proj": True,
        "vision_config": {"model_type": "siglip_vision_model", **{k: VISION[k] for k in (
            "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "patch_size",
            "image_size", "layer_norm_eps", "hidden_act")}},
    }


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def key_prefixes(keys, depth=3) -> list[str]:
    return sorted({".".join(k.split(".")[:depth]) for k in keys})


def safetensors_keys(folder: Path) -> list[str]:
    keys = []
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            keys += list(s.keys())
    return keys


# ---------------------------------------------------------------------------------------------- main
def build_variant(name: str, out_dir: Path, cases) -> dict:
    tie, layer, seed, layouts, hf_new_kwargs = VARIANTS[name]
    print(f"== {name}: tie={tie} vision_feature_layer={layer} seed={seed}")
    model = make_model(tie, layer, seed)

    golden, gaps = {}, {}
    for cname, case in cases.items():
        golden[f"{cname}.input_ids"] = case["input_ids"]
        if "pixel_values" in case:
            golden[f"{cname}.pixel_values"] = case["pixel_values"]
            vf, imf = vision_and_image_features(model, case["pixel_values"])
            golden[f"{cname}.vision_features"] = vf
            golden[f"{cname}.image_features"] = imf
        golden[f"{cname}.logits"] = logits_of(model, case)
        if cname in ("two_images", "text_only"):
            golden[f"{cname}.greedy"], gaps[cname] = greedy(model, case)
            print(f"    greedy {cname}: {golden[f'{cname}.greedy'].tolist()} (min top-2 gap {gaps[cname]:.3g})")
    golden = {k: v.detach().contiguous() for k, v in golden.items()}

    stats = vision_stats(model, cases["two_images"]["pixel_values"])
    print(f"    vision token std per hidden state: {['%.2e' % s for s in stats['median_token_std_of_hidden_states']]};"
          f" projector pre-activation std {stats['projector_preactivation_std']:.2f}")
    margins = wrong_variant_margins(model, cases)
    noise = float32_noise_floor(model, cases)

    out_dir.mkdir(parents=True)
    save_file(golden, str(out_dir / "golden.safetensors"), metadata={"format": "pt"})
    layout_info = {}
    if "hf" in layouts:
        d = out_dir / "hf"
        d.mkdir()
        save_file(hf_hub_state_dict(model), str(d / "model.safetensors"), metadata={"format": "pt"})
        write_json(d / "config.json", hf_hub_config(tie, layer))
        layout_info["hf"] = {"how": "state_dict renamed by hand to the hub's names; hand-written hub-style config"}
    if "hf_new" in layouts:
        d = out_dir / "hf_new"
        model.save_pretrained(str(d), safe_serialization=True, **hf_new_kwargs)
        layout_info["hf_new"] = {"how": f"save_pretrained(dir, safe_serialization=True, **{hf_new_kwargs})",
                                 "files": sorted(p.name for p in d.iterdir()),
                                 "key_prefixes": key_prefixes(safetensors_keys(d))}
    if "original" in layouts:
        d = out_dir / "original"
        d.mkdir()
        save_file(original_state_dict(model, seed), str(d / "model.safetensors"), metadata={"format": "pt"})
        write_json(d / "config.json", original_config(tie))
        layout_info["original"] = {"how": "state_dict renamed to the lmms-lab names + random image_newline",
                                   "image_slot_id_for_model_under_test": ORIGINAL_IMAGE_SLOT}

    meta = {
        "variant": name,
        "reference": {"transformers": transformers.__version__, "torch": torch.__version__,
                      "python": sys.version.split()[0], "attn_implementation": model.config._attn_implementation,
                      "device": "cpu", "dtype": "float32", "torch_threads": torch.get_num_threads()},
        "seeds": {"weights": seed, "inputs": INPUT_SEED, "image_newline": seed + 500},
        "image_token_index": IMAGE_TOKEN,
        "tie_word_embeddings": tie,
        "vision_feature_layer": layer,
        "layouts": layout_info,
        "cases": {c: {k: list(v.shape) for k, v in golden.items() if k.startswith(c + ".")} for c in cases},
        "greedy": {"max_new_tokens": GREEDY_NEW_TOKENS, "do_sample": False, "use_cache": True,
                   "eos_token_id": None, "pad_token_id": None,
                   "note": "eos disabled so that generation never stops early; only the new tokens are stored",
                   "min_top1_top2_logit_gap": gaps},
        "tolerance_used_for_margins": "max|diff| <= 1e-5 + 2e-6 * max|ref|",
        "wrong_variant_margins": margins,
        "float32_noise_floor_in_units_of_the_bound": noise,
        "vision_stats_two_images": stats,
    }
    write_json(out_dir / "meta.json", meta)
    return meta


@torch.no_grad()
def verify_variant(name: str, out_dir: Path, cases) -> None:
    tie, layer, seed, layouts, _ = VARIANTS[name]
    golden = load_file(str(out_dir / "golden.safetensors"))
    for lay in ("hf", "hf_new"):
        if lay not in layouts:
            continue
        m = LlavaForConditionalGeneration.from_pretrained(str(out_dir / lay), dtype=torch.float32).eval()
        assert m.config.tie_word_embeddings == tie and m.config.vision_feature_layer == layer
        assert m.config.text_config.rope_parameters["rope_theta"] == 1e6
        assert m.config.vision_config.layer_norm_eps == 1e-6
        for cname, case in cases.items():
            d = float((logits_of(m, case) - golden[f"{cname}.logits"]).abs().max())
            assert d == 0.0, f"{name}/{lay}/{cname}: reloaded logits differ by {d}"
        print(f"    verified {name}/{lay}: from_pretrained logits identical (max|diff| 0) on all cases")
    if "original" in layouts:
        ref = make_model(tie, layer, seed).state_dict()
        if tie:
            ref = {k: v for k, v in ref.items() if k != "lm_head.weight"}
        back = reverse_original(load_file(str(out_dir / "original" / "model.safetensors")))
        assert set(back) == set(ref), set(back) ^ set(ref)
        for k in ref:
            assert back[k].dtype == torch.float32 and torch.equal(back[k], ref[k]), k
        print(f"    verified {name}/original: {len(back)} tensors + image_newline, bit-identical after reverse rename")


def main() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    cases = make_inputs()
    tmp = Path(tempfile.mkdtemp(prefix=".build_", dir=HERE))
    try:
        metas = {}
        for name in VARIANTS:
            metas[name] = build_variant(name, tmp / name, cases)
            verify_variant(name, tmp / name, cases)
        for name in VARIANTS:  # swap in
            final = HERE / name
            old = HERE / f".old_{name}"
            if old.exists():
                shutil.rmtree(old)
            if final.exists():
                os.rename(final, old)
            os.rename(tmp / name, final)
            if old.exists():
                shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = sum(p.stat().st_size for n in VARIANTS for p in (HERE / n).rglob("*") if p.is_file())
    for name, meta in metas.items():
        if "hf_new" in meta["layouts"]:
            print(f"{name}/hf_new key prefixes: {meta['layouts']['hf_new']['key_prefixes']}")
    print(f"wrote {', '.join(VARIANTS)} under {HERE} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
