"""Issue 16, the loader's part: paths confined to their folders, checkpoints read through the
safetensors library, config.json and index files checked by type and range before anything is
built, malformed records refused with InputError, and no allocation or decoding that cannot fit."""
import json
import math
import os
import shutil
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import interleave
from helpers import golden_path, write_tiny_tokenizer

INDEX = "model.safetensors.index.json"
SHARD = "model-00002-of-00003.safetensors"
# What /etc/passwd starts with: read as a header length it is 3619251681095544690 (the leak).
PASSWD = b"root:*:0:0:root:/root:/bin/sh\n"


def copy_golden(tmp_path, variant="untied", layout="hf_new"):
    folder = tmp_path / "ckpt"
    shutil.copytree(golden_path(variant, layout), folder)
    return folder


def point_shard_at(folder, target):
    """Rewrite the index so that every entry of SHARD names target instead."""
    index = json.loads((folder / INDEX).read_text())
    for key, shard in index["weight_map"].items():
        if shard == SHARD:
            index["weight_map"][key] = target
    (folder / INDEX).write_text(json.dumps(index))


def load_error(folder):
    with pytest.raises(interleave.CheckpointError) as info:
        interleave.load(folder)
    return str(info.value)


# ---- 2. shard names stay inside the checkpoint folder

def test_a_shard_named_by_an_absolute_path_is_refused(tmp_path):
    folder = copy_golden(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # A valid safetensors file outside the folder: it used to load silently.
    shutil.copy(folder / SHARD, elsewhere / SHARD)
    os.remove(folder / SHARD)
    point_shard_at(folder, str(elsewhere / SHARD))
    message = load_error(folder)
    assert INDEX in message and str(elsewhere / SHARD) in message and "absolute" in message


def test_a_shard_that_climbs_out_is_refused_without_reading_it(tmp_path):
    folder = copy_golden(tmp_path)
    (tmp_path / "passwd").write_bytes(PASSWD * 4)
    point_shard_at(folder, "../passwd")
    message = load_error(folder)
    assert INDEX in message and "'../passwd'" in message and "outside" in message
    # Nothing of the file's contents: neither its bytes nor its first 8 bytes read as a number.
    assert str(int.from_bytes(PASSWD[:8], "little")) not in message
    assert "root:*" not in message


def test_a_shard_symlink_that_escapes_is_refused(tmp_path):
    folder = copy_golden(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(folder / SHARD, elsewhere / SHARD)
    os.symlink(elsewhere / SHARD, folder / SHARD)
    message = load_error(folder)
    assert INDEX in message and SHARD in message and "symbolic link" in message


def test_a_single_file_symlink_that_escapes_is_refused(tmp_path):
    folder = copy_golden(tmp_path, layout="hf")
    shutil.move(folder / "model.safetensors", tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", folder / "model.safetensors")
    assert "model.safetensors is a symbolic link to a file outside the folder" in load_error(folder)


def test_the_hugging_face_cache_layout_still_loads(tmp_path):
    """huggingface_hub's cache: snapshots/<commit>/<file> are links to ../../blobs/<hash>."""
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, name in enumerate(sorted(os.listdir(golden_path("untied", "hf_new")))):
        shutil.copy(golden_path("untied", "hf_new", name), repo / "blobs" / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snapshot / name)
    model = interleave.load(snapshot)
    reference = interleave.load(golden_path("untied", "hf_new"))
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)


# ---- 7. the index, the files, config.json: checked before anything is built

@pytest.mark.parametrize("index, words", [
    ([1, 2], "must be a JSON object"),
    ({"metadata": {}}, "no weight_map"),
    ({"weight_map": ["a", "b"]}, "weight_map must map"),
    ({"weight_map": {"lm_head.weight": 3}}, "weight_map must map"),
    ({"weight_map": {"lm_head.weight": None}}, "weight_map must map"),
])
def test_a_malformed_index_is_named(tmp_path, index, words):
    folder = copy_golden(tmp_path)
    (folder / INDEX).write_text(json.dumps(index))
    message = load_error(folder)
    assert INDEX in message and words in message


def write_raw(file, header, data=b"\0" * 16):
    """A safetensors file with this header (JSON-encoded unless it is bytes) and data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header", [
    [1, 2], None, "a string",
    {"a": {**ENTRY, "shape": "2"}},
    {"a": {**ENTRY, "shape": [-2]}},
    {"a": {**ENTRY, "data_offsets": [-8, 0]}},
    {"a": {**ENTRY, "data_offsets": ["0", "8"]}},
    {"a": ENTRY, "b": {**ENTRY, "data_offsets": [4, 12]}},            # overlapping
    {"a": {**ENTRY, "data_offsets": [8, 16]}},                         # a gap before the data
    b'{"a": ' + json.dumps(ENTRY).encode() + b', "a": ' + json.dumps(ENTRY).encode() + b"}",  # duplicate
    b"[" * 200_000 + b"]" * 200_000,                                  # nested 200k deep
    b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
])
def test_headers_the_safetensors_library_rejects_are_refused(tmp_path, header):
    file = tmp_path / "model.safetensors"
    write_raw(file, header)
    with pytest.raises(interleave.CheckpointError, match="model.safetensors is truncated or corrupt"):
        interleave.open_safetensors(str(file))


def test_checkpoints_are_read_through_the_safetensors_library(monkeypatch):
    opened = []
    real = interleave.safe_open

    def spy(file, framework, device="cpu"):
        opened.append((os.path.basename(file), framework))
        return real(file, framework=framework, device=device)
    monkeypatch.setattr(interleave, "safe_open", spy)
    interleave.load(golden_path("untied", "hf"))
    assert opened == [("model.safetensors", "pt")]


def test_the_stored_dtype_is_kept_and_the_file_is_mapped(tmp_path):
    file = tmp_path / "model.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.bfloat16), "b": torch.ones(2, 3, dtype=torch.float16)}, file)
    tensors = interleave.open_safetensors(str(file))
    assert tensors["a"].dtype == torch.bfloat16 and tensors["b"].dtype == torch.float16
    assert not tensors["a"].untyped_storage().resizable()           # a view of the map, not a copy
    tensors["a"].add_(1)                                             # a private map: the file keeps its bytes
    assert torch.equal(load_file(file)["a"], torch.arange(6, dtype=torch.bfloat16))


HF = json.loads(open(golden_path("untied", "hf", "config.json")).read())
ORIGINAL = json.loads(open(golden_path("untied", "original", "config.json")).read())


def changed(config, path, value):
    """A copy of config with the value at path (a tuple of keys) replaced, or removed for ...."""
    config = json.loads(json.dumps(config))
    block = config
    for key in path[:-1]:
        block = block[key]
    if value is ...:
        del block[path[-1]]
    else:
        block[path[-1]] = value
    return config


@pytest.mark.parametrize("config, field, value", [
    (changed(HF, ("text_config", "hidden_size"), "64"), "text_config.hidden_size", "'64'"),
    (changed(HF, ("text_config", "hidden_size"), 0), "text_config.hidden_size", "0"),
    (changed(HF, ("text_config", "intermediate_size"), -96), "text_config.intermediate_size", "-96"),
    (changed(HF, ("text_config", "num_attention_heads"), True), "text_config.num_attention_heads", "True"),
    (changed(HF, ("text_config", "vocab_size"), 320.5), "text_config.vocab_size", "320.5"),
    (changed(HF, ("text_config", "num_key_value_heads"), float("nan")), "text_config.num_key_value_heads", "nan"),
    (changed(HF, ("text_config", "max_position_embeddings"), [4096]), "text_config.max_position_embeddings",
     "[4096]"),
    (changed(HF, ("text_config", "rms_norm_eps"), float("nan")), "text_config.rms_norm_eps", "nan"),
    (changed(HF, ("text_config", "rms_norm_eps"), 0), "text_config.rms_norm_eps", "0"),
    (changed(HF, ("text_config", "rope_theta"), -1e6), "text_config.rope_theta", "-1000000.0"),
    (changed(HF, ("text_config", "rope_theta"), float("inf")), "text_config.rope_theta", "inf"),
    (changed(HF, ("text_config", "tie_word_embeddings"), "false"), "tie_word_embeddings", "'false'"),
    (changed(HF, ("vision_config", "image_size"), "120"), "vision_config.image_size", "'120'"),
    (changed(HF, ("vision_config", "layer_norm_eps"), "1e-6"), "vision_config.layer_norm_eps", "'1e-6'"),
    (changed(HF, ("vision_config", "patch_size"), 0), "vision_config.patch_size", "0"),
    (changed(HF, ("vision_feature_layer",), True), "vision_feature_layer", "True"),
    (changed(HF, ("image_token_index",), "300"), "image_token_index", "'300'"),
    (changed(HF, ("text_config",), [1, 2]), "text_config", "[1, 2]"),
    (changed(HF, ("vision_config",), "siglip"), "vision_config", "'siglip'"),
    (changed(ORIGINAL, ("hidden_size",), "64"), "hidden_size", "'64'"),
    (changed(ORIGINAL, ("num_hidden_layers",), -2), "num_hidden_layers", "-2"),
    (changed(ORIGINAL, ("image_grid_pinpoints",), []), "image_grid_pinpoints", "[]"),
    (changed(ORIGINAL, ("image_grid_pinpoints",), "(1x1),...,(6x6)"), "image_grid_pinpoints", "'(1x1),...,(6x6)'"),
    (changed(ORIGINAL, ("image_grid_pinpoints",), [[384]]), "image_grid_pinpoints", "[[384]]"),
    (changed(ORIGINAL, ("image_grid_pinpoints",), [[384, 0]]), "image_grid_pinpoints", "[[384, 0]]"),
    (changed(ORIGINAL, ("image_grid_pinpoints",), [[60, 60]]), "image_grid_pinpoints", "[[60, 60]]"),
    (changed(ORIGINAL, ("image_grid_pinpoints",), [["384", 768]]), "image_grid_pinpoints", "[['384', 768]]"),
])
def test_config_values_are_checked_by_type_and_range(config, field, value):
    with pytest.raises(interleave.CheckpointError) as info:
        interleave.config_from_dict(config)
    message = str(info.value)
    assert "\n" not in message and f"{field} = {value}" in message


@pytest.mark.parametrize("top", [[HF], "llava", 5, None])
def test_a_config_whose_top_level_is_not_an_object_is_refused(tmp_path, top):
    folder = copy_golden(tmp_path, layout="hf")
    (folder / "config.json").write_text(json.dumps(top))
    assert "config.json must be a JSON object" in load_error(folder)


def test_the_layer_count_is_checked_before_the_model_is_built(tmp_path, monkeypatch):
    folder = copy_golden(tmp_path, layout="hf")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 100_000
    (folder / "config.json").write_text(json.dumps(config))

    def never(config):
        raise AssertionError("the model was built before the layer count was checked")
    monkeypatch.setattr(interleave, "LlavaInterleave", never)
    message = load_error(folder)
    assert "num_hidden_layers = 100000" in message and "holds 2" in message


def test_a_checkpoint_of_integers_is_refused(tmp_path):
    folder = copy_golden(tmp_path, layout="hf")
    tensors = load_file(folder / "model.safetensors")
    tensors["language_model.model.embed_tokens.weight"] = torch.zeros(320, 64, dtype=torch.int32)
    save_file(tensors, folder / "model.safetensors")
    assert "int32" in load_error(folder)


# ---- 3. record_to_sample: media confined to image_folder, every malformed record an InputError

@pytest.fixture(scope="module")
def model():
    return interleave.load(golden_path("untied", "original"))        # tile 120: 64 slots per image


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return interleave.load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def noise(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def conversation(question="<image>\nWhat is it?"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": "a picture"}]


@pytest.fixture
def media(tmp_path):
    """An image folder with a.png and clip/, and outside it secret.png and secret_clip/."""
    folder = tmp_path / "images"
    (folder / "clip").mkdir(parents=True)
    (tmp_path / "secret_clip").mkdir()
    noise(20, 20).save(folder / "a.png")
    noise(20, 20).save(tmp_path / "secret.png")
    for i in range(3):
        noise(16, 16, i).save(folder / "clip" / f"{i}.png")
        noise(16, 16, i).save(tmp_path / "secret_clip" / f"{i}.png")
    return folder


@pytest.mark.parametrize("field, path, words", [
    ("image", "SECRET", "is absolute"),
    ("image", "../secret.png", "climbs out of"),
    ("image", "clip/../../secret.png", "climbs out of"),
    ("image", ["a.png", "../secret.png"], "climbs out of"),
    ("video", "../secret_clip", "climbs out of"),
    ("video", "SECRET_CLIP", "is absolute"),
])
def test_media_outside_the_image_folder_are_refused(model, tok, media, field, path, words):
    secrets = {"SECRET": str(media.parent / "secret.png"), "SECRET_CLIP": str(media.parent / "secret_clip")}
    path = [secrets.get(p, p) for p in path] if isinstance(path, list) else secrets.get(path, path)
    markers = "<image>" * (len(path) if isinstance(path, list) else 1)
    record = {"id": "r", field: path, "conversations": conversation(markers + "\nWhat is it?")}
    with pytest.raises(interleave.InputError, match=words) as info:
        interleave.record_to_sample(record, str(media), tok, model.config)
    assert "\n" not in str(info.value) and "record 'r'" in str(info.value)
    # The explicit option reads them, and paths inside the folder always load.
    assert interleave.record_to_sample(record, str(media), tok, model.config, allow_outside=True).pixel_values is not None
    inside = {"id": "ok", "image": ["clip/../a.png"], "conversations": conversation()}
    assert interleave.record_to_sample(inside, str(media), tok, model.config).pixel_values.shape[0] == 1


@pytest.mark.parametrize("record, words", [
    ([1, 2], "not a JSON object"),
    ("text", "not a JSON object"),
    ({"id": "r"}, "no conversations"),
    ({"id": "r", "conversations": 5}, "conversations must be a list"),
    ({"id": "r", "conversations": "hi"}, "conversations must be a list"),
    ({"id": "r", "conversations": {"from": "human"}}, "conversations must be a list"),
    ({"id": "r", "conversations": []}, "conversations is empty"),
    ({"id": "r", "conversations": [5]}, "turn 0 is 5"),
    ({"id": "r", "conversations": [["human", "hi"]]}, "turn 0 is"),
    ({"id": "r", "conversations": [{"from": "human"}]}, "turn 0 has no 'value'"),
    ({"id": "r", "conversations": [{"value": "hi"}]}, "turn 0 has no 'from'"),
    ({"id": "r", "conversations": [{"from": "system", "value": "hi"}]}, "'from': 'system'"),
    ({"id": "r", "conversations": [{"from": ["human"], "value": "hi"}]}, "'from': ['human']"),
    ({"id": "r", "conversations": [{"from": "human", "value": 5}]}, "'value' must be a string"),
    ({"id": "r", "conversations": [{"from": "human", "value": None}]}, "'value' must be a string"),
    ({"id": "r", "conversations": [{"from": "human", "value": ["a"]}]}, "'value' must be a string"),
    ({"id": "r", "image": 5, "conversations": conversation()}, "'image' must be"),
    ({"id": "r", "image": {"a": 1}, "conversations": conversation()}, "'image' must be"),
    ({"id": "r", "image": [1], "conversations": conversation()}, "'image' must be"),
    ({"id": "r", "image": ["a.png", None], "conversations": conversation("<image><image>")}, "'image' must be"),
    ({"id": "r", "video": 5, "conversations": conversation()}, "'video' must be"),
    ({"id": "r", "video": ["clip"], "conversations": conversation()}, "'video' must be"),
    ({"id": "r", "video": "clip", "image": "a.png", "conversations": conversation()}, "both"),
    ({"id": "r", "image": "missing.png", "conversations": conversation()}, "does not exist"),
    ({"id": "r", "image": "clip", "conversations": conversation()}, "cannot read"),
])
def test_malformed_records_raise_input_error(model, tok, media, record, words):
    with pytest.raises(interleave.InputError) as info:
        interleave.record_to_sample(record, str(media), tok, model.config)
    assert words in str(info.value) and "\n" not in str(info.value)


# ---- 8. no allocation and no decoding that cannot fit

def test_generate_refuses_a_kv_cache_larger_than_memory(model):
    ids = torch.randint(0, 300, (1, 10))
    huge = 10 ** 15
    model.config.text.max_positions = 2 * huge                       # a config.json that allows it
    try:
        with pytest.raises(interleave.InputError) as info:
            model.generate(ids, max_new_tokens=huge)
    finally:
        model.config.text.max_positions = 4096
    message = str(info.value)
    assert "KV cache" in message and "max_new_tokens" in message and "10 prompt tokens" in message


def test_generate_measures_the_cache_against_the_device(model, monkeypatch):
    ids = torch.randint(0, 300, (1, 10))
    # 2 (keys, values) x 2 layers x 2 kv heads x 16 positions x 16 dims x 4 bytes
    assert interleave.kv_cache_bytes(model.config.text, 1, 16, torch.float32) == 8192
    monkeypatch.setattr(interleave, "device_memory_bytes", lambda device: 8191)
    with pytest.raises(interleave.InputError, match="max_new_tokens"):
        model.generate(ids, max_new_tokens=6)
    monkeypatch.setattr(interleave, "device_memory_bytes", lambda device: 8192)
    assert model.generate(ids, max_new_tokens=6, stop_ids=()).shape == (1, 6)


@pytest.mark.parametrize("num_frames", [0, -5, 1.5, "4"])
def test_num_frames_below_one_is_refused(tmp_path, num_frames):
    (tmp_path / "clip").mkdir()
    for i in range(4):
        noise(8, 8, i).save(tmp_path / "clip" / f"{i}.png")
    with pytest.raises(interleave.InputError, match="num_frames must be a whole number of at least 1"):
        interleave.read_video_frames(tmp_path / "clip", num_frames)


def count_decodes(monkeypatch):
    """Count the images that are decoded (read_image_file loads the pixels)."""
    decoded = []
    real = interleave.read_image_file

    def counting(source):
        decoded.append(source)
        return real(source)
    monkeypatch.setattr(interleave, "read_image_file", counting)
    return decoded


def test_too_many_frames_are_refused_before_any_is_decoded(tmp_path, monkeypatch):
    (tmp_path / "clip").mkdir()
    for i in range(100):
        noise(8, 8, i).save(tmp_path / "clip" / f"{i:03}.png")
    decoded = count_decodes(monkeypatch)
    with pytest.raises(interleave.InputError, match="100 frames.*more than the 64"):
        interleave.read_video_frames(tmp_path / "clip", 100, max_frames=64)
    assert decoded == []
    assert len(interleave.read_video_frames(tmp_path / "clip", 64, max_frames=64)) == 64


def test_build_inputs_counts_the_slots_before_decoding(model, tok, tmp_path, monkeypatch):
    for i in range(70):                                              # 70 x 64 slots > 4096 positions
        noise(8, 8, i).save(tmp_path / f"{i}.png")
    frames = [str(tmp_path / f"{i}.png") for i in range(70)]
    decoded = count_decodes(monkeypatch)
    with pytest.raises(interleave.InputError, match="4480 image slots.*more than the model's context of 4096"):
        interleave.build_inputs([("user", "What happens?", frames)], tok, model.config)
    assert decoded == []
    sample = interleave.build_inputs([("user", "What happens?", frames[:60])], tok, model.config)
    assert sample.pixel_values.shape[0] == 60 and len(decoded) == 60
