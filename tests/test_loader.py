"""The checkpoint loader: dtypes, memory mapping, and loud failures on every kind of bad folder."""
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import interleave

GOLDENS = os.path.join(os.path.dirname(__file__), "goldens")


def copy_checkpoint(tmp_path, variant="untied", layout="hf"):
    folder = tmp_path / f"{variant}-{layout}"
    shutil.copytree(os.path.join(GOLDENS, variant, layout), folder)
    return folder


def rewrite_weights(folder, change):
    """Apply change(dict of tensors) to a single-file checkpoint."""
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors")


def load_error(folder):
    with pytest.raises(interleave.CheckpointError) as info:
        interleave.load(folder)
    return str(info.value)


def test_bf16_checkpoint_loads_without_a_float32_detour(tmp_path):
    folder = copy_checkpoint(tmp_path)
    fp32 = load_file(folder / "model.safetensors")
    rewrite_weights(folder, lambda t: t.update({k: v.bfloat16() for k, v in t.items()}))
    model = interleave.load(folder)                                  # default: the stored dtype
    params = dict(model.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    stored = params["decoder.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(stored, fp32["language_model.model.layers.0.self_attn.q_proj.weight"].bfloat16())
    widened = interleave.load(folder, dtype=torch.float32)
    w = dict(widened.named_parameters())["vision.layers.1.fc1.weight"]
    assert w.dtype == torch.float32
    assert torch.equal(w, fp32["vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight"].bfloat16().float())
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():      # bf16 runs and stays near the float32 model (a sanity check, not the parity test)
        ref = interleave.load(os.path.join(GOLDENS, "untied", "hf"))(ids)
        assert (model(ids).float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_parameters_are_views_of_the_file_when_no_cast_is_needed():
    model = interleave.load(os.path.join(GOLDENS, "untied", "hf"))
    param = model.decoder.embed_tokens.weight
    # A view of the memory map does not own its storage: torch.frombuffer storages are not resizable.
    assert not param.untyped_storage().resizable()
    param.data.add_(1.0)                                             # private mapping: the file is untouched
    again = interleave.load(os.path.join(GOLDENS, "untied", "hf"))
    assert not torch.equal(again.decoder.embed_tokens.weight, param)


def test_tied_head_shares_the_embedding():
    model = interleave.load(os.path.join(GOLDENS, "tied", "original"))
    assert model.lm_head.weight is model.decoder.embed_tokens.weight
    untied = interleave.load(os.path.join(GOLDENS, "untied", "original"))
    assert not torch.equal(untied.lm_head.weight, untied.decoder.embed_tokens.weight)


def test_vision_layer_count_comes_from_the_checkpoint(tmp_path):
    folder = copy_checkpoint(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 4                # the releases' configs say 27 ...
    (folder / "config.json").write_text(json.dumps(config))
    assert len(interleave.load(folder).vision.layers) == 3           # ... and the files hold 26


def test_mismatches_are_all_listed(tmp_path):
    folder = copy_checkpoint(tmp_path)

    def damage(t):
        del t["language_model.model.layers.1.self_attn.k_proj.bias"]
        del t["multi_modal_projector.linear_2.weight"]
        t["vision_tower.vision_model.head.probe"] = torch.zeros(1, 1, 48)
        t["language_model.model.norm.weight"] = torch.ones(65)
        t["vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(97, 48)
    rewrite_weights(folder, damage)
    message = load_error(folder)
    assert "2 missing: decoder.layers.1.self_attn.k_proj.bias, projector.linear_2.weight" in message
    assert "1 unexpected: vision.head.probe" in message
    assert "2 wrong shape" in message and "decoder.norm.weight: checkpoint (65,), config wants (64,)" in message
    assert "vision.layers.0.fc1.weight: checkpoint (97, 48), config wants (96, 48)" in message


def test_untied_config_without_head_says_how_to_fix(tmp_path):
    folder = copy_checkpoint(tmp_path, "tied", "hf")
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(config))
    message = load_error(folder)
    assert "1 missing: lm_head.weight" in message and "set tie_word_embeddings=true" in message


@pytest.mark.parametrize("damage, words", [
    (lambda f: shutil.rmtree(f), "does not exist"),
    (lambda f: os.remove(f / "config.json"), "no config.json"),
    (lambda f: (f / "config.json").write_text("{ not json"), "cannot read"),
    (lambda f: (f / "config.json").write_text('{"model_type": "bert"}'), "unknown model_type 'bert'"),
    (lambda f: os.remove(f / "model.safetensors"), "no model.safetensors"),
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-1000]),
     "truncated or corrupt"),
    (lambda f: (f / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage-header}"),
     "truncated or corrupt .unreadable header"),
    (lambda f: (f / "model.safetensors").write_bytes(b"\xff" * 8 + b"x" * 100), "truncated or corrupt .header of"),
    (lambda f: (f / "model.safetensors").write_bytes(b"abc"), "truncated or corrupt .only 3 bytes"),
])
def test_bad_folders_fail_with_a_clear_message(tmp_path, damage, words):
    folder = copy_checkpoint(tmp_path)
    damage(folder)
    assert re.search(words, load_error(folder))


def test_sharded_checkpoint_with_a_missing_shard(tmp_path):
    folder = copy_checkpoint(tmp_path, "untied", "hf_new")
    assert len(interleave.load(folder).vision.layers) == 3           # loads as it is
    os.remove(folder / "model-00002-of-00003.safetensors")
    assert "shard model-00002-of-00003.safetensors listed in" in load_error(folder)


def test_hf_layout_with_an_image_newline_key_allows_multipatch(tmp_path):
    """train.py stores `image_newline` as an extra key of the HF layout (transformers ignores it)."""
    folder = copy_checkpoint(tmp_path, "tied", "hf")
    assert not interleave.load(folder).config.has_image_newline
    rewrite_weights(folder, lambda t: t.update(image_newline=torch.randn(64)))
    model = interleave.load(folder)
    assert model.config.has_image_newline and model.image_newline.shape == (64,)
