"""The four M4 scenarios end to end (multi-image, video, 3D views, multi-patch), training samples and packing."""
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import interleave
from helpers import golden_path, write_tiny_tokenizer
from test_config import ORIGINAL_05B

RELEASE = interleave.config_from_dict(ORIGINAL_05B)        # tile 384, 27 x 27 = 729 tokens, the release's canvases


@pytest.fixture(scope="module")
def model():
    return interleave.load(golden_path("untied", "original"))   # tile 120: 8 x 8 = 64 slots per image


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return interleave.load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def noise(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def slot_runs(ids, slot):
    """(start, length) of each run of image slots."""
    runs, ids = [], list(ids)
    for i, t in enumerate(ids):
        if t == slot and (i == 0 or ids[i - 1] != slot):
            runs.append([i, 0])
        if t == slot:
            runs[-1][1] += 1
    return [tuple(run) for run in runs]


# ---- Multi-patch (anyres): an independent re-derivation of the ORIGINAL release's rule, written from docs/MODEL.md §4

def original_rule_tokens(w0, h0, tile=384, s=27, pinpoints=((384, 768), (768, 384), (768, 768), (1152, 384),
                                                             (384, 1152))):
    best = None
    for width, height in pinpoints:                                # (width, height), first best wins
        scale = min(width / w0, height / h0)
        effective = min(int(w0 * scale) * int(h0 * scale), w0 * h0)
        key = (effective, -(width * height - effective))
        if best is None or key > best[0]:
            best = (key, width, height)
    rows, cols = best[2] // tile, best[1] // tile
    grid_h, grid_w = rows * s, cols * s
    if w0 / h0 > grid_w / grid_h:
        kept_rows, kept_cols = grid_h - 2 * ((grid_h - int(h0 * (grid_w / w0))) // 2), grid_w
    else:
        kept_rows, kept_cols = grid_h, grid_w - 2 * ((grid_w - int(w0 * (grid_h / h0))) // 2)
    return (best[1], best[2]), s * s + kept_rows * (kept_cols + 1)


@pytest.mark.parametrize("size, canvas, tokens", [
    ((1000, 1000), (768, 768), 3699),      # docs/MODEL.md §4's example: 729 + 54 * 55
    ((1000, 300), (1152, 384), 2779),      # wide: 3 tiles in a row, 25 of 27 rows kept
    ((300, 1000), (384, 1152), 2835),      # tall: 3 tiles in a column, 25 of 27 columns kept
    ((5000, 4000), (768, 768), 3149),      # huge: 44 of 54 rows kept
    ((30, 20), (384, 768), 1233),          # tiny: every canvas ties; the first (1 wide x 2 high) wins
    ((300, 200), (384, 768), 1233),        # landscape yet 1 wide x 2 high: the tie rule, where transformers differs
])
def test_multipatch_token_counts(size, canvas, tokens):
    assert interleave.select_canvas(size, RELEASE.grid_pinpoints) == canvas
    assert interleave.image_slots(RELEASE, size) == tokens
    assert original_rule_tokens(*size) == (canvas, tokens)


def test_multipatch_counts_follow_the_original_rule_everywhere():
    rng = np.random.default_rng(0)
    sizes = [tuple(int(v) for v in rng.integers(1, 3000, 2)) for _ in range(500)] + [(1, 1), (1, 2999), (2999, 1)]
    for size in sizes:
        assert (interleave.select_canvas(size, RELEASE.grid_pinpoints), interleave.image_slots(RELEASE, size)) == \
            original_rule_tokens(*size), size


def test_multipatch_views_are_base_then_tiles_on_black():
    image = Image.new("RGB", (1000, 300), (255, 255, 255))
    pixels = interleave.preprocess(image, RELEASE, anyres=True)
    assert pixels.shape == (4, 3, 384, 384)                         # base + 3 tiles of the 1152 x 384 canvas
    assert torch.all(pixels[0] == 1.0)                              # the base view is the whole image, squashed
    # the white image is 1152 x 346 on the canvas, pasted at y = 19: black (-1.0) bands above and below
    assert torch.all(pixels[1:, :, :19] == -1.0) and torch.all(pixels[1:, :, 19 + 346:] == -1.0)
    assert torch.all(pixels[1:, :, 21:19 + 344] == 1.0)


ANYRES = sorted(json.load(open(golden_path("anyres", "meta.json")))["images"].items())


@pytest.fixture(scope="module")
def anyres_model():
    return interleave.load(golden_path("anyres", "original"))


@pytest.mark.parametrize("name, info", ANYRES, ids=[name for name, _ in ANYRES])
def test_multipatch_matches_reference_or_the_original_rule(anyres_model, name, info):
    """Views and spliced features of tests/goldens/make_anyres_goldens.py: transformers' LLaVA-NeXT where it follows
    the original release; where it departs (docs/MODEL.md §4 "!"), the golden maker's re-derivation of the original rule."""
    g = golden("anyres")
    key = name if info["fair_comparison"] else f"{name}.original_rule"
    image = Image.open(golden_path("anyres", info["file"]))
    assert image.size == tuple(info["size_wh"])
    pixels = interleave.preprocess(image, anyres_model.config, anyres=True)
    u8 = g.get(f"{key}.pixel_values_uint8", g[f"{name}.pixel_values_uint8"])
    assert torch.equal(pixels, (u8.float() / 255 - 0.5) / 0.5)
    with torch.no_grad():
        features = anyres_model.encode_image(pixels, image_size=image.size)
    assert features.shape[0] == info["original_rule"]["tokens"] == interleave.image_slots(anyres_model.config,
                                                                                           image.size)
    ref = g[f"{key}.features"]
    assert (features - ref).abs().max() <= 1e-5 + 2e-6 * ref.abs().max()


def golden(variant):
    from safetensors.torch import load_file
    return load_file(golden_path(variant, "golden.safetensors"))


def test_hf_checkpoint_refuses_multipatch():
    config = interleave.load(golden_path("tied", "hf")).config
    with pytest.raises(interleave.InputError, match="only the original lmms-lab release carries"):
        interleave.preprocess(noise(200, 100), config, anyres=True)
    model = interleave.load(golden_path("tied", "hf"))
    with pytest.raises(ValueError, match="needs the `image_newline` vector"):
        model.encode_image(torch.zeros(3, 3, 120, 120), image_size=(240, 100))


# ---- Images in any mode, and bad image files

def test_any_pil_mode_and_exif_orientation(tmp_path):
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert interleave.open_image(rgba).getpixel((0, 0)) == (255, 0, 0)       # alpha dropped, as the release does
    assert interleave.open_image(Image.new("P", (4, 4))).mode == "RGB"
    assert interleave.open_image(Image.new("L", (4, 4), 128)).getpixel((0, 0)) == (128, 128, 128)
    assert interleave.open_image(Image.new("CMYK", (4, 4), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    deep = Image.new("I;16", (4, 4))
    deep.putpixel((0, 0), 65535)
    deep.putpixel((1, 0), 32896)
    rgb = interleave.open_image(deep)
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 0)) == (128, 128, 128)  # scaled, not clipped
    pixels = interleave.preprocess(deep, RELEASE)
    assert pixels.shape == (1, 3, 384, 384) and pixels.max() <= 1.0 and pixels.min() >= -1.0
    exif = Image.Exif()
    exif[0x0112] = 6                                                # orientation: rotate 90 degrees clockwise
    Image.new("RGB", (40, 20)).save(tmp_path / "phone.jpg", exif=exif)
    assert interleave.open_image(tmp_path / "phone.jpg").size == (20, 40)


def test_bad_images_are_reported(tmp_path, monkeypatch):
    noise(50, 50).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("not an image")
    for name, words in [("missing.png", "does not exist"), ("cut.png", "cannot read"), ("text.jpg", "cannot read")]:
        with pytest.raises(interleave.InputError, match=words):
            interleave.preprocess(tmp_path / name, RELEASE)
    with pytest.raises(interleave.InputError, match="zero size"):
        interleave.preprocess(Image.new("RGB", (0, 0)), RELEASE)
    assert interleave.preprocess(Image.new("RGB", (1, 1)), RELEASE, anyres=True).shape == (3, 3, 384, 384)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)           # 50 x 50 is then > 2x the limit: a "bomb"
    with pytest.raises(interleave.InputError, match="too large to decode safely"):
        interleave.preprocess(tmp_path / "ok.png", RELEASE)


# ---- Video frames

def test_frame_indices_are_uniform():
    assert interleave.sample_frame_indices(10, 4) == [0, 3, 6, 9]
    assert interleave.sample_frame_indices(100, 16) == [0, 6, 13, 19, 26, 33, 39, 46, 52, 59, 66, 72, 79, 85, 92, 99]
    assert interleave.sample_frame_indices(5, 16) == [0, 1, 2, 3, 4]      # fewer frames than asked: all of them
    assert interleave.sample_frame_indices(1, 16) == [0]


def test_video_sources(tmp_path):
    colours = [(i * 20, 0, 0) for i in range(12)]
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, colour in enumerate(colours):                             # frame_2 must come before frame_10
        Image.new("RGB", (8, 8), colour).save(folder / f"frame_{i}.png")
    (folder / "notes.txt").write_text("not a frame")
    red = lambda frames: [frame.getpixel((0, 0))[0] for frame in frames]
    assert red(interleave.read_video_frames(folder, 4)) == [0, 60, 140, 220]   # indices 0, 3, 7, 11
    gif = [Image.new("P", (8, 8), i) for i in range(12)]
    for frame in gif:
        frame.putpalette([v for c in colours for v in c] + [0] * (768 - 36))
    gif[0].save(tmp_path / "clip.gif", save_all=True, append_images=gif[1:], duration=40)
    assert red(interleave.read_video_frames(tmp_path / "clip.gif", 4)) == [0, 60, 140, 220]
    assert len(interleave.read_video_frames([Image.new("RGB", (8, 8))] * 3, 16)) == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(interleave.InputError, match="no video frames in"):
        interleave.read_video_frames(tmp_path / "empty")


# ---- Conversations -> model inputs: the slot layout of each scenario

def test_multi_image_slots_stand_where_the_markers_are(model, tok):
    images = [noise(60, 40, 1), noise(40, 60, 2)]
    sample = interleave.build_inputs([("user", "Compare <image> and <image> please", images)], tok, model.config,
                                     loss_on="replies")
    slot = model.config.image_token_id
    (a, n1), (b, n2) = slot_runs(sample.input_ids.tolist(), slot)
    assert n1 == n2 == 64 and tok.decode(sample.input_ids[a + 64:b].tolist()) == " and "
    assert tok.decode(sample.input_ids[:a].tolist()).endswith("user\nCompare ")
    assert sample.pixel_values.shape == (2, 3, 120, 120)
    assert torch.equal(sample.pixel_values[1], interleave.preprocess(images[1], model.config)[0])
    assert (sample.labels == interleave.IGNORE).all()                # a prompt carries no loss


def test_video_and_3d_views_go_in_front_without_markers(model, tok, tmp_path):
    frames = interleave.read_video_frames([noise(30, 30, i) for i in range(20)], 16)
    for images, question in [(frames, "Which way does it move?"), ([noise(50, 50, 7)] * 3, "How many cubes?")]:
        sample = interleave.build_inputs([("user", question, images)], tok, model.config)
        runs = slot_runs(sample.input_ids.tolist(), model.config.image_token_id)
        assert [n for _, n in runs] == [64 * len(images)]              # adjacent images: one run of slots
        start = runs[0][0] + 64 * len(images)
        assert tok.decode(sample.input_ids[start:].tolist()).startswith("\n" + question)   # in front, then \n
        assert sample.pixel_values.shape[0] == len(images)
    with pytest.raises(interleave.InputError, match="has 1 <image> markers but 2 images"):
        interleave.build_inputs([("user", "<image> vs", [noise(9, 9), noise(9, 9)])], tok, model.config)


def test_labels_cover_replies_and_their_im_end_only(model, tok):
    turns = [("user", "<image> what changed?", [noise(20, 20)]), ("assistant", "the cat"),
             ("user", "sure?"), ("assistant", "yes")]
    sample = interleave.build_inputs(turns, tok, model.config, loss_on="replies")
    labelled = sample.labels != interleave.IGNORE
    assert torch.equal(sample.labels[labelled], sample.input_ids[labelled])
    assert tok.decode(sample.labels[labelled].tolist(), skip_special_tokens=False) == "the cat<|im_end|>yes<|im_end|>"


def test_record_to_sample_and_truncation(model, tok, tmp_path):
    for i in range(3):
        noise(30, 30, i).save(tmp_path / f"{i}.png")
    record = {"id": "r1", "image": ["0.png", "1.png", "2.png"],
              "conversations": [{"from": "human", "value": "<image><image><image>\nWhich one differs?"},
                                {"from": "gpt", "value": "The second one differs from the others."}]}
    full = interleave.record_to_sample(record, tmp_path, tok, model.config, loss_on="replies")
    (start, n), = slot_runs(full.input_ids.tolist(), model.config.image_token_id)
    assert n == 192 and full.pixel_values.shape[0] == 3
    answer_from = int((full.labels != interleave.IGNORE).nonzero()[0])
    short = interleave.truncate(full, answer_from + 3, model.config)  # cuts the text of the answer only
    assert len(short.input_ids) == answer_from + 3 and short.pixel_values.shape[0] == 3
    with pytest.raises(interleave.InputError, match="no answer left"):
        interleave.truncate(full, start + 100, model.config)          # would cut through the second image
    record["conversations"][0]["value"] = "<image>\nWhich one differs?"
    with pytest.raises(interleave.InputError, match="has 1 <image> markers, 3 images"):
        interleave.record_to_sample(record, tmp_path, tok, model.config)


def test_video_record_with_fewer_frames_than_markers(model, tok, tmp_path):
    (tmp_path / "clip").mkdir()
    for i in range(5):
        noise(16, 16, i).save(tmp_path / "clip" / f"{i}.jpg")
    record = {"id": "v", "video": "clip", "conversations": [
        {"from": "human", "value": "<image>" * 16 + "\nWhere does the dot go?"}, {"from": "gpt", "value": "left"}]}
    sample = interleave.record_to_sample(record, tmp_path, tok, model.config)
    (start, n), = slot_runs(sample.input_ids.tolist(), model.config.image_token_id)
    assert n == 5 * 64 and sample.pixel_values.shape[0] == 5               # all 5 frames, one run, in front
    assert tok.decode(sample.input_ids[start + n:].tolist()).startswith("\nWhere does the dot go?")
    (tmp_path / "empty").mkdir()
    with pytest.raises(interleave.InputError, match="no video frames"):
        interleave.record_to_sample({**record, "video": "empty"}, tmp_path, tok, model.config)


def test_truncation_never_cuts_through_an_image(model, tok):
    turns = [("user", "<image> first", [noise(20, 20, 1)]), ("assistant", "one"),
             ("user", "<image> second", [noise(20, 20, 2)]), ("assistant", "two")]
    full = interleave.build_inputs(turns, tok, model.config)
    (_, _), (second, _) = slot_runs(full.input_ids.tolist(), model.config.image_token_id)
    cut = interleave.truncate(full, second + 10, model.config)       # 10 slots into the second image
    assert len(cut.input_ids) == second and cut.pixel_values.shape[0] == 1 and len(cut.image_sizes) == 1
    assert cut.input_ids[-1] != model.config.image_token_id


# ---- Packing: samples in one sequence never see each other

@pytest.mark.parametrize("attn", ["plain", "sdpa", "triton"])
def test_packed_logits_equal_each_sample_alone(model, tok, attn):
    model.set_attention(attn)
    samples = [interleave.build_inputs([("user", "<image> what is it?", [noise(30, 30, 1)]), ("assistant", "a cat")],
                                       tok, model.config),
               interleave.build_inputs([("user", "hello there")], tok, model.config),
               interleave.build_inputs([("user", "compare", [noise(30, 30, 2), noise(30, 30, 3)])], tok, model.config)]
    pack, = interleave.pack_samples(samples, budget=400)
    assert pack.cu_seqlens.dtype == torch.int32 and pack.cu_seqlens[-1] == len(pack.input_ids)
    with torch.no_grad():
        packed = model(pack.input_ids[None], pack.pixel_values, pack.image_sizes, pack.position_ids[None],
                       pack.cu_seqlens)[0]
        order = sorted(samples, key=lambda s: -len(s.input_ids))     # the packer places the longest first
        for i, sample in enumerate(order):
            alone = model(sample.input_ids[None], sample.pixel_values, sample.image_sizes)[0]
            begin, end = pack.cu_seqlens[i], pack.cu_seqlens[i + 1]
            assert (packed[begin:end] - alone).abs().max() <= 1e-5
    model.set_attention("sdpa")


def test_packing_fills_the_budget(capsys):
    rng = np.random.default_rng(0)
    samples = [interleave.Sample(torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), None, [])
               for n in rng.integers(50, 900, 400)]
    packs = interleave.pack_samples(samples, budget=2048)
    assert all(len(p.input_ids) <= 2048 for p in packs)
    assert sum(len(p.input_ids) for p in packs) == sum(len(s.input_ids) for s in samples)
    assert "% real tokens" in capsys.readouterr().out
    assert sum(len(s.input_ids) for s in samples) / (len(packs) * 2048) >= 0.95
    with pytest.raises(interleave.InputError, match="exceeds the packing budget"):
        interleave.pack_samples(samples, budget=100)


@pytest.mark.parametrize("impl", ["plain", "triton"])
def test_a_query_that_sees_no_key_gets_zeros_on_every_path(impl):
    # Causal with more queries than keys (bottom-right aligned): the first two queries see nothing.
    torch.manual_seed(0)
    q = torch.randn(1, 4, 5, 8)
    k = torch.randn(1, 2, 3, 8)
    v = torch.randn(1, 2, 3, 8)
    want = interleave.attention(q, k, v, True, "sdpa")
    got = interleave.attention(q, k, v, True, impl)
    assert not got.isnan().any()
    assert torch.equal(got[:, :, :2], torch.zeros_like(got[:, :, :2]))
    assert (got - want).abs().max() < 1e-5
