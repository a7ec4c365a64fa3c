"""One check per exercise: the answer against the project's own code, on fresh random inputs.

    python -m pytest exercises                  # every exercise
    python -m pytest exercises -k rotary        # one
    EXERCISE_HINT=1 python -m pytest exercises -k rotary    # with a nudge (2: the idea, 3: where the project does it)

An exercise still raising NotImplementedError is reported as "not done yet". While an answer runs, the project
functions it re-implements refuse to run (forbid=..., exercises/check.py): an answer that only calls them fails. A
wrong answer fails with a message that says what differs (shape, dtype, the first differing element: the reference's
value and yours) and a hint: the known mistake it behaves like (exercises/mistakes.py), else a general one.
"""
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

import interleave
from exercises.check import Hint, answer, attempt, fail, in_parts, same_list, same_tensor
from interleave import IGNORE


def tiny_config():
    """A model small enough to build in milliseconds: 32-pixel images of 2 x 2 patches (4 slots each), GQA decoder."""
    vision = interleave.VisionConfig(hidden=8, intermediate=16, heads=2, layers=1, image_size=32, patch_size=16)
    text = interleave.TextConfig(hidden=16, intermediate=32, heads=4, kv_heads=2, head_dim=8, layers=2,
                                 vocab=64, rope_theta=1e4, max_positions=256)
    return interleave.ModelConfig(vision, text, "hf", image_token_id=63)


def tiny_model():
    return interleave.LlavaInterleave(tiny_config()).eval()


# ==== ex01-ex03: warm-ups

def test_ex01_rmsnorm():
    rms_norm = answer("ex01_rmsnorm").rms_norm
    general = "mean of x^2 over the last dim, eps inside the square root, in float32; cast back, then times weight"
    for shape, dtype in (((3, 5, 16), torch.float32), ((64, 96), torch.bfloat16)):
        x = (torch.randn(shape) * 3).to(dtype)
        x.view(-1, shape[-1])[0] *= 1e-4   # a row so small that eps matters
        weight = (1 + torch.randn(shape[-1]) / 4).to(dtype)
        norm = interleave.RMSNorm(shape[-1], eps=1e-6)
        norm.weight.data = weight
        with torch.no_grad():
            want = norm(x)
        got = attempt(1, rms_norm, x, weight, 1e-6, forbid=[interleave.RMSNorm.forward])
        hint = Hint("ex01_rmsnorm.rms_norm", general, got, x, weight, 1e-6)
        if dtype == torch.float32:
            same_tensor("rms_norm in float32", got, want, hint, atol=1e-5, rtol=1e-4)
            continue
        same_tensor("rms_norm in bfloat16", got, want, hint, atol=2e-2, rtol=2e-2)
        # Equivalent float32 formulas may round a rare element differently; the wrong order rounds many.
        differ = (got != want).float().mean().item()
        if differ > 0.01:
            hint.general = "cast the normalised x back to bfloat16 BEFORE multiplying by the weight"
            fail(f"rms_norm in bfloat16: {100 * differ:.0f}% of the elements differ from the reference by a rounding "
                 "step", hint)


def test_ex02_rotary():
    apply_rotary = answer("ex02_rotary").apply_rotary
    b, h, t, d = 2, 3, 7, 16
    x = torch.randn(b, h, t, d)
    cos, sin = interleave.rotary_tables(torch.randint(0, 4000, (b, t)), d, 1e6, torch.float32)
    want = interleave.apply_rotary(x, cos, sin)
    got = attempt(2, apply_rotary, x.clone(), cos, sin, forbid=[interleave.apply_rotary])
    general = "each pair (a, b) = (x[i], x[i + D/2]) -> (a cos - b sin, b cos + a sin)"
    same_tensor("apply_rotary", got, want, Hint("ex02_rotary.apply_rotary", general, got, x, cos, sin),
                atol=1e-5, rtol=1e-4)


def test_ex03_frames():
    sample_frame_indices = answer("ex03_frames").sample_frame_indices
    cases = [(1, 16), (7, 7), (16, 16), (17, 16), (100, 4), (1000, 16), (5, 1), (2, 1), (301, 32)]
    cases += [(random.randint(1, 5000), random.randint(1, 32)) for _ in range(20)]
    forbid = [interleave.sample_frame_indices]
    got = [attempt(3, sample_frame_indices, total, n, forbid=forbid) for total, n in cases]
    for (total, n), indices in zip(cases, got):
        if not isinstance(indices, (list, tuple, np.ndarray)):
            fail(f"sample_frame_indices({total}, {n}) returned a {type(indices).__name__}", "return a list of ints")
    got = [[int(i) for i in indices] for indices in got]

    def run(candidate):
        """A known mistake's answers to every case (the hint names the mistake that matches them all)."""
        return [[int(i) for i in candidate(total, n)] for total, n in cases]

    hint = Hint("ex03_frames.sample_frame_indices", "np.linspace from frame 0 to the LAST frame, total - 1; every "
                "frame when total <= num_frames", got, run=run)
    for (total, n), indices in zip(cases, got):
        same_list(f"sample_frame_indices({total}, {n})", indices, interleave.sample_frame_indices(total, n), hint)


# ==== ex04, ex05, ex16: the token stream

def test_ex04_splice():
    splice_images = answer("ex04_splice").splice_images
    forbid = [interleave.LlavaInterleave.embed]
    model, slot = tiny_model(), 63
    ids = torch.randint(0, slot, (3, 12))
    for row, n_slots in enumerate(random.sample(range(1, 8), 3)):   # a different number of slots in each row
        ids[row, torch.randperm(12)[:n_slots]] = slot
    features = torch.randn(int((ids == slot).sum()), 16)

    def encode_images(pixels, sizes):
        """The vision tower is not this exercise's subject: these features stand for its output."""
        return features

    model.encode_images = encode_images
    with torch.no_grad():
        want = model.embed(ids, pixel_values=torch.zeros(1))
        text = model.decoder.embed_tokens(ids.masked_fill(ids == slot, 0))
    before = text.clone()
    got = attempt(4, splice_images, text, ids, slot, features, forbid=forbid)
    general = "the k-th slot, counting row by row through the whole batch, takes features[k]; every other " \
              "position keeps its embedding"
    same_tensor("splice_images", got, want, Hint("ex04_splice.splice_images", general, got, before, ids, slot,
                                                 features))
    if not torch.equal(text, before):
        fail("splice_images changed text_embeds in place", "return a new tensor (clone first)")
    try:
        attempt(4, splice_images, text, ids, slot, features[:-1], forbid=forbid)
    except ValueError:
        return
    fail(f"splice_images accepted {len(features) - 1} feature vectors for {len(features)} slots",
         "raise ValueError when the number of feature vectors is not the number of slots")


# Qwen2's pre-tokenizer pattern: a run of newlines is one piece, and so is a full stop with the newlines after it
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def small_tokenizer():
    """A byte-level BPE tokenizer like Qwen2's, trained here in milliseconds (no files needed). It has tokens for
    "\\n\\n" and ".\\n", which are not lone newlines."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["You are a helpful assistant. Compare the pictures: what moved, what changed?"] * 10
                            + ["Look.\n\nThen, tell me\n\nwhat moved.\n"] * 10, trainer)
    return tok


def random_image():
    """A small plain-coloured PIL image of a random size."""
    size = (random.randint(8, 60), random.randint(8, 60))
    return Image.new("RGB", size, tuple(random.randint(0, 255) for _ in range(3)))


def test_ex05_labels():
    ids_and_labels = answer("ex05_labels").ids_and_labels
    tokenizer, config = small_tokenizer(), tiny_config()
    n = random.randint(1, 3)
    turns = [("user", random.choice(["Compare these.", "What changed?"]), [random_image() for _ in range(n)]),
             ("assistant", random.choice(["The circle moved.", "Nothing."])),
             ("user", random.choice(["Show me\n\nthe first one.", "Look.\n\nThen, show me\n\nthe first."])),
             ("assistant", "Here it is: <image> the red one.", [random_image()]),   # an image inside a reply
             ("user", random.choice(["Thanks\nbye", "Thanks.\nBye"])), ("assistant", "You are welcome.\n\nBye.")]
    want = interleave.build_inputs(turns, tokenizer, config, add_generation_prompt=False)
    segments = interleave.chat_segments(turns, add_generation_prompt=False)
    inputs = (segments, tokenizer, config.image_token_id, config.vision.tokens)
    got = attempt(5, ids_and_labels, *inputs, forbid=[interleave.build_inputs, interleave.record_to_sample])
    if not (isinstance(got, tuple) and len(got) == 2):
        fail(f"ids_and_labels returned {type(got).__name__}", "return two lists: (ids, labels)")
    got = ([int(t) for t in got[0]], [int(t) for t in got[1]])
    same_list("ids", got[0], want.input_ids.tolist(),
              Hint("ex05_labels.ids_and_labels", "tokenize each segment on its own with interleave.encode_prompt "
                   "and concatenate", got, *inputs))
    same_list("labels", got[1], want.labels.tolist(),
              Hint("ex05_labels.ids_and_labels", f"the label is the token id in an assistant turn (header to "
                   f"newline) and at every <|im_start|>, <|im_end|> and lone newline, never at an image slot "
                   f"({config.image_token_id}); IGNORE ({IGNORE}) everywhere else; no shift", got, *inputs))


def test_ex16_template():
    chat_segments = answer("ex16_template").chat_segments
    forbid = [interleave.chat_segments, interleave.chat_prompt, interleave.build_inputs]
    conversations = [
        ([("user", "What is in these?", ["a", "b"])], {}),                        # images in front of the text
        ([("user", "Compare <image> and <image>.", ["a", "b"]), ("assistant", "The first is red."),
          ("user", "And this one?", ["c"])], {"system": "Answer briefly."}),
        ([("user", "Hi"), ("assistant", "Hello!")], {}),                            # ends with a reply: no prompt
        ([("user", "Hi"), ("assistant", "Hello!")], {"add_generation_prompt": True}),
        ([("user", "Describe it.", [])], {"add_generation_prompt": False}),          # an empty list of images
        ([("user", "Here: <image>", ["a"]), ("assistant", "It is <image>, look.", ["b"])], {}),   # a reply's image
    ]
    general = "system segment; per turn: header, text + <|im_end|> (is_reply for the assistant), '\\n'; images " \
              "without markers in front of the text; the generation prompt after a user turn by default"
    for i, (turns, options) in enumerate(conversations):
        want = interleave.chat_segments(turns, **options)
        got = attempt(16, chat_segments, turns, forbid=forbid, **options)
        if not isinstance(got, list):
            fail(f"chat_segments returned a {type(got).__name__}", "return a list of (text, is_reply) pairs")
        got = [tuple(segment) for segment in got]

        def run(candidate, turns=turns, options=options):
            """A known mistake on the same conversation."""
            return candidate(turns, **options)

        same_list(f"chat_segments(conversation {i}: {turns}, {options})", got, want,
                  Hint("ex16_template.chat_segments", general, got, run=run))
    for turns in ([("user", "Two: <image> <image>", ["a"])], [("user", "<image> but none", [])]):
        try:
            attempt(16, chat_segments, turns, forbid=forbid)
        except ValueError:
            continue
        fail(f"chat_segments({turns}) did not raise ValueError", "a turn with an images list and markers needs "
             "exactly one marker per image")


# ==== ex06, ex17: multi-patch

def test_ex06_anyres():
    module = answer("ex06_anyres")
    forbid = [interleave.select_canvas, interleave.multipatch_layout]
    sizes = [(1, 1), (100, 50), (50, 100), (384, 384), (385, 384), (1000, 1000), (2000, 300), (300, 2000),
             (1000, 700), (29, 232), (376, 47), (333, 127), (80, 200)]
    sizes += [(random.randint(1, 2500), random.randint(1, 2500)) for _ in range(300)]
    sizes += [(random.randint(1, 200), random.randint(1, 200)) for _ in range(50)]
    setups = [(384, 27), (64, 4)]   # the releases' 384-pixel tiles of 27 x 27 features; the tiny model's 64 / 4 x 4

    def pinpoints_of(tile):
        """The releases' five canvases, in tiles of this size: 1 x 2, 2 x 1, 2 x 2, 3 x 1, 1 x 3 (w x h)."""
        return [(tile * a, tile * b) for a, b in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]

    def check_canvas():
        cases = [(size, pinpoints_of(tile)) for tile, _ in setups for size in sizes]
        got = [attempt(6, module.select_canvas, size, pinpoints, forbid=forbid) for size, pinpoints in cases]
        got = [None if canvas is None else tuple(canvas) for canvas in got]

        def run(candidate):
            """A known mistake's canvases for every case."""
            return [candidate(size, pinpoints) for size, pinpoints in cases]

        hint = Hint("ex06_anyres.select_canvas", "the most effective pixels, then the least waste, and strict "
                    "comparisons: the first of equals wins", got, run=run)
        for (size, pinpoints), canvas in zip(cases, got):
            want = interleave.select_canvas(size, pinpoints)
            if canvas != want:
                fail(f"select_canvas({size}, {pinpoints}): reference {want}, yours {canvas}", hint)

    def check_unpad():
        cases = []
        for tile, s in setups:
            config = interleave.ModelConfig(interleave.VisionConfig(image_size=tile, patch_size=tile // s),
                                            interleave.TextConfig(), "hf", grid_pinpoints=pinpoints_of(tile))
            for size in sizes:
                _, rows, cols, crop = interleave.multipatch_layout(size, config)
                cases.append(((size, rows, cols, s), crop))
        got = [attempt(6, module.unpad, *inputs, forbid=forbid) for inputs, _ in cases]
        got = [None if crop is None else tuple(crop) for crop in got]

        def run(candidate):
            """A known mistake's crops for every case."""
            return [candidate(*inputs) for inputs, _ in cases]

        hint = Hint("ex06_anyres.unpad", "bands above and below when w0 / h0 > cw / ch; truncate with int(), do not "
                    "round", got, run=run)
        for ((size, rows, cols, s), want), crop in zip(cases, got):
            if crop != want:
                fail(f"unpad({size}, rows={rows}, cols={cols}, s={s}): reference {want}, yours {crop}", hint)

    in_parts(6, module, [("select_canvas", check_canvas), ("unpad", check_unpad)])


def test_ex17_newlines():
    merge_tiles = answer("ex17_newlines").merge_tiles
    forbid = [interleave.LlavaInterleave.merge_tiles, interleave.LlavaInterleave.encode_images,
              interleave.LlavaInterleave.encode_image]
    # 32-pixel tiles of 4 x 4 features; a tiny decoder of width 16 (the projected vectors' width)
    vision = interleave.VisionConfig(hidden=8, intermediate=16, heads=2, layers=1, image_size=32, patch_size=8)
    text = interleave.TextConfig(hidden=16, intermediate=32, heads=2, kv_heads=2, head_dim=8, layers=1, vocab=64)
    pinpoints = [(32, 64), (64, 32), (64, 64), (96, 32), (32, 96)]
    config = interleave.ModelConfig(vision, text, "original", grid_pinpoints=pinpoints, has_image_newline=True)
    model = interleave.LlavaInterleave(config).eval()
    newline = torch.randn(16)
    model.image_newline.data = newline.clone()
    sizes = [(100, 40), (40, 100), (70, 70), (200, 60), (33, 90), (64, 64), (20, 30)]
    sizes += [(random.randint(10, 300), random.randint(10, 300)) for _ in range(10)]
    general = "one grid of rows * s by cols * s features, as they lie on the canvas; cropped; a newline at the END " \
              "of each row; the base view first"
    for size in sizes:
        views = torch.randn(interleave.image_views(config, size), 16, 16)   # (1 + rows * cols, s * s, H)
        with torch.no_grad():
            want = model.merge_tiles(views, size)
        got = attempt(17, merge_tiles, views.clone(), size, config, newline.clone(), forbid=forbid)
        _, rows, cols, crop = interleave.multipatch_layout(size, config)
        same_tensor(f"merge_tiles of a {size[0]} x {size[1]} image ({rows} x {cols} tiles, crop {crop})", got, want,
                    Hint("ex17_newlines.merge_tiles", general, got, views, size, config, newline), atol=0, rtol=0)


# ==== ex07: packing

def random_samples(n, images, lengths=None):
    """n Samples of random lengths (two of equal length) unless given, the first token of sample i being i so that
    a pack's samples can be told apart; with images, some samples carry one or two images."""
    if lengths is None:
        lengths = [random.randint(3, 40) for _ in range(n)]
        lengths[n // 2] = lengths[0]   # equal lengths: their given order must be kept
    samples = []
    for i, length in enumerate(lengths):
        ids = torch.randint(100, 500, (length,))
        ids[0] = i
        labels = ids.masked_fill(torch.rand(length) < 0.5, IGNORE)
        labels[0] = IGNORE
        n_images = random.choice([0, 1, 2]) if images else 0
        pixels = torch.randn(n_images, 3, 8, 8) if n_images else None
        sizes = [random.choice([None, (30, 20)]) for _ in range(n_images)]
        samples.append(interleave.Sample(ids, labels, pixels, sizes))
    return samples


def members(pack_ids, samples):
    """Which samples (their numbers) a pack's input_ids hold, in order; None where they cannot be read."""
    found, at = [], 0
    while at < len(pack_ids):
        i = int(pack_ids[at])
        ids = samples[i].input_ids if 0 <= i < len(samples) else None
        if ids is None or not torch.equal(pack_ids[at:at + len(ids)], ids):
            return found + [None]
        found.append(i)
        at += len(ids)
    return found


def test_ex07_packing():
    pack = answer("ex07_packing").pack
    forbid = [interleave.pack_samples]
    # First a case where first fit longest first differs from every other order and rule (checked by hand), then
    # random ones, with and without images.
    for n, images, fixed, budget in ((6, True, [5, 30, 12, 30, 20, 8], 40), (7, True, None, 0), (6, False, None, 0)):
        samples = random_samples(n, images, fixed)
        lengths = [len(s.input_ids) for s in samples]
        budget = budget or max(lengths) + random.randint(0, 30)
        want = interleave.pack_samples(samples, budget, verbose=False)
        got = attempt(7, pack, samples, budget, forbid=forbid)
        what = f"pack(samples of lengths {lengths}, budget={budget})" + ("" if images else ", no images")
        hint = Hint("ex07_packing.pack", "first fit, longest first: each sample into the first pack with room", got,
                    samples, budget)
        if not (isinstance(got, list) and all(isinstance(p, interleave.Sample) for p in got)):
            fail(f"{what} returned a {type(got).__name__}", "return a list of interleave.Sample, one per pack")
        want_groups = [members(p.input_ids, samples) for p in want]
        got_groups = [members(p.input_ids, samples) if torch.is_tensor(p.input_ids) else [None] for p in got]
        if got_groups != want_groups:
            fail(f"{what}: which sample goes in which pack (samples numbered as given): reference {want_groups}, "
                 f"yours {got_groups}", hint)
        for j, (mine, theirs) in enumerate(zip(got, want)):
            for field in ("input_ids", "labels", "position_ids", "cu_seqlens"):
                same_tensor(f"{what}, pack {j}: {field}", getattr(mine, field), getattr(theirs, field), hint)
            if (mine.pixel_values is None) != (theirs.pixel_values is None):
                fail(f"{what}, pack {j}: pixel_values {'is' if mine.pixel_values is None else 'is not'} None",
                     "concatenate the pixel_values of the pack's samples that have images; None if none has")
            if theirs.pixel_values is not None:
                same_tensor(f"{what}, pack {j}: pixel_values", mine.pixel_values, theirs.pixel_values, hint)
            same_list(f"{what}, pack {j}: image_sizes", mine.image_sizes, theirs.image_sizes, hint)
    too_long = random_samples(3, False)
    try:
        attempt(7, pack, too_long, len(too_long[0].input_ids) - 1, forbid=forbid)
    except ValueError:
        return
    fail("pack accepted a sample longer than the budget", "raise ValueError: it must be truncated first")


# ==== ex08, ex09, ex15: generation

def reference_top_p(logits, top_p, monkeypatch):
    """The probabilities interleave.next_token samples from after its top-p filter: its torch.multinomial call is
    intercepted to read them."""
    seen = {}

    def multinomial(probs, num_samples, generator=None):
        seen["probs"] = probs
        return torch.zeros(len(probs), num_samples, dtype=torch.long)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "multinomial", multinomial)
        interleave.next_token(logits, torch.zeros(len(logits), 1, dtype=torch.long), temperature=1.0, top_p=top_p)
    return seen["probs"]


def test_ex08_top_p(monkeypatch):
    top_p_filter = answer("ex08_top_p").top_p_filter
    cases = []
    for top_p in (0.8, 0.5, 0.3, 0.95, 0.0):   # 0.8: the releases' setting
        for _ in range(100):   # draw again if a token sits on the boundary, where float rounding could go either way
            logits = torch.randn(6, 40) * random.choice([1.0, 2.5])
            probs = logits.softmax(-1).sort(dim=-1, descending=True).values
            if ((probs.cumsum(-1) - probs - top_p)[:, 1:].abs() > 1e-4).all():   # the top token always stays
                break
        cases.append((logits, top_p))
    got = [attempt(8, top_p_filter, logits.clone(), top_p, forbid=[interleave.next_token]) for logits, top_p in cases]

    def run(candidate):
        """A known mistake's filtered logits for every case."""
        return [candidate(logits.clone(), top_p) for logits, top_p in cases]

    hint = Hint("ex08_top_p.top_p_filter", "keep a token iff the more likely tokens total less than top_p; always "
                "keep the top one", got, run=run)
    for (logits, top_p), filtered in zip(cases, got):
        want = reference_top_p(logits, top_p, monkeypatch)
        what = f"top_p_filter(logits (6, 40), top_p={top_p})"
        if not isinstance(filtered, torch.Tensor) or filtered.shape != logits.shape:
            fail(f"{what} returned {getattr(filtered, 'shape', type(filtered).__name__)}",
                 "return logits of the same shape")
        kept_got, kept_want, p = filtered > float("-inf"), want > 0, logits.softmax(-1)
        for row in range(len(logits)):
            if not torch.equal(kept_got[row], kept_want[row]):
                token = int((kept_got[row] != kept_want[row]).nonzero()[0])
                more = float(p[row][p[row] > p[row, token]].sum())
                fail(f"{what}, row {row}: the reference keeps {int(kept_want[row].sum())} token(s), yours "
                     f"{int(kept_got[row].sum())}; token {token} (probability {p[row, token]:.3f}, the more likely "
                     f"tokens total {more:.3f}) is {'kept' if kept_want[row, token] else 'dropped'} by the reference",
                     hint)
        hint.general = "leave the kept logits unchanged; dropped ones become -inf"
        same_tensor(f"{what}: softmax of your filtered logits", filtered.softmax(-1), want, hint, atol=1e-6)


def test_ex09_kv_cache():
    KVCache = answer("ex09_kv_cache").KVCache
    forbid = [interleave.KVCache.__init__, interleave.KVCache.update]
    layers, b, kv_heads, max_len, d = 2, 2, 2, 10, 4
    shape = (layers, b, kv_heads, max_len, d, torch.float32, "cpu")
    ours = interleave.KVCache(*shape)
    theirs = attempt(9, KVCache, *shape, forbid=forbid)
    general = "store at positions start .. start + T - 1, then return the layer's keys and values of 0 .. start + T - 1"
    updates = []
    for layer, start, t in ((0, 0, 6), (1, 0, 6), (0, 6, 1), (1, 6, 1), (0, 7, 2), (1, 7, 2)):
        updates.append((layer, start, torch.randn(b, kv_heads, t, d), torch.randn(b, kv_heads, t, d)))
    for i, (layer, start, k, v) in enumerate(updates):
        want = ours.update(layer, start, k, v)
        got = attempt(9, theirs.update, layer, start, k.clone(), v.clone(), forbid=forbid)

        def replay(candidate, i=i):
            """A known mistake's answer to the same updates, up to this one."""
            cache = candidate(*shape)
            for update in updates[:i + 1]:
                out = cache.update(*update)
            return tuple(out)

        hint = Hint("ex09_kv_cache.KVCache", general, tuple(got), run=replay)
        for name, g, w in zip(("keys", "values"), got, want):
            same_tensor(f"update(layer={layer}, start={start}, {k.shape[2]} new positions): {name}", g, w, hint)
    # The point of a cache: decoding token by token gives the logits of recomputing the whole sequence.
    model, t = tiny_model(), 12
    c = model.config.text
    ids = torch.randint(0, 60, (b, t))
    with torch.no_grad():
        full = model(ids)                                                          # (B, T, vocab)
        cache = attempt(9, KVCache, c.layers, b, c.kv_heads, t, c.head_dim, torch.float32, "cpu", forbid=forbid)
        prompt = attempt(9, model, ids[:, :5], cache=cache, forbid=forbid)
        same_tensor("logits of the prompt (positions 0-4) run with your cache", prompt, full[:, :5], general,
                    atol=1e-4, rtol=1e-4)
        for pos in range(5, t):
            step = attempt(9, model, ids[:, pos:pos + 1], cache=cache, start=pos, forbid=forbid)
            same_tensor(f"logits at position {pos}, decoded with your cache", step, full[:, pos:pos + 1], general,
                        atol=1e-4, rtol=1e-4)


def decoder_runs(model, generate, *inputs):
    """generate(model, *inputs) and, for each run of the decoder it made, (positions computed, the first one's
    position)."""
    runs = []

    def record(module, args, kwargs):
        """The length and start of each decoder run."""
        x = args[0] if args else kwargs["x"]
        positions = args[1] if len(args) > 1 else kwargs["positions"]
        runs.append((x.shape[1], int(positions[0, 0])))

    hook = model.decoder.register_forward_pre_hook(record, with_kwargs=True)
    try:
        out = generate(model, *inputs)
    finally:
        hook.remove()
    return out, runs


def telling_stop(endless):
    """A stop id that ends one row early, where that row would have gone on with another token (so a stopped row's
    repeats show), and that no other row emits; None if the rows have none."""
    for row in range(len(endless)):
        others = torch.cat([endless[:row], endless[row + 1:]]).flatten().tolist()
        for k in range(1, endless.shape[1] - 2):
            token = int(endless[row, k])
            first = token not in endless[row, :k].tolist()
            if first and token not in others and int(endless[row, k + 1]) != token:
                return token
    return None


def test_ex15_generate():
    greedy = answer("ex15_generate").greedy
    generation = [getattr(interleave.LlavaInterleave, name) for name in ("generate", "prefill", "decode_step")
                  if hasattr(interleave.LlavaInterleave, name)]
    forbid = generation + [interleave.next_token]
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight[63] = 0   # the image slot id is never the most likely token
    b = 3    # prompts
    t = 10   # tokens in each
    n = 10   # new tokens at most
    # One row must stop early and repeat its stop id while the others go on: draw prompts until the model's
    # answers to them have such a stop id (a tiny random model often cycles through a few tokens).
    for _ in range(50):
        ids = torch.randint(0, 60, (b, t))
        for row in range(b):   # one 4-slot image per row
            at = random.randint(1, t - 5)
            ids[row, at:at + 4] = 63
        pixels = torch.randn(b, 3, 32, 32)
        endless = model.generate(ids, pixels, max_new_tokens=n, stop_ids=(), cuda_graph=False)
        stop = telling_stop(endless)
        if stop is not None:
            break
    text_only = torch.randint(0, 60, (1, 4))
    text_endless = model.generate(text_only, None, max_new_tokens=n, stop_ids=(), cuda_graph=False)
    stops = [int(endless[0, 2]) if stop is None else stop]
    text_stops = [int(text_endless[0, 3])]   # the text-only prompt ends early
    general = "the argmax of the last position's logits; the k-th new token (from 0) sits at position T + k; " \
              "a stopped row repeats its stop id until every row has stopped"
    for prompt, images, stop_ids in ((ids, pixels, stops), (text_only, None, text_stops)):
        inputs = (prompt, images, n, stop_ids)
        want = model.generate(prompt, images, max_new_tokens=n, stop_ids=stop_ids, cuda_graph=False)

        def student(model, *inputs):
            """The answer, with the project's generation refusing to run."""
            return attempt(15, greedy, model, *inputs, forbid=forbid)

        got, runs = decoder_runs(model, student, *inputs)

        def tokens(candidate, inputs=inputs):
            """A known mistake's tokens on the same prompt."""
            return candidate(model, *inputs)

        def calls(candidate, inputs=inputs):
            """A known mistake's decoder runs on the same prompt."""
            return decoder_runs(model, candidate, *inputs)[1]

        what = f"greedy(prompts {tuple(prompt.shape)}, {'with' if images is not None else 'no'} images, " \
               f"max_new_tokens={n}, stop_ids={stop_ids})"
        same_tensor(what, got, want, Hint("ex15_generate.greedy", general, got, run=tokens))
        t = prompt.shape[1]
        expected = [(t, 0)] + [(1, t + k) for k in range(len(runs) - 1)]
        if [length for length, _ in runs] != [length for length, _ in expected]:
            fail(f"{what}: the decoder ran on {[length for length, _ in runs]} positions, call after call",
                 f"run the prompt once ({t} positions, into the cache), then one new token per call")
        if runs != expected:
            k = next(k for k, (run, right) in enumerate(zip(runs, expected)) if run != right)
            fail(f"{what}: decoder run {k} started at position {runs[k][1]}, the reference's at {expected[k][1]}",
                 Hint("ex15_generate.greedy", general, runs, run=calls))


# ==== ex10, ex13: attention

def fold_blocks(step, scores, v, block):
    """(m, l, acc) after folding every key block of scores into a running softmax with step (for the mistakes)."""
    n_q, d = scores.shape[0], v.shape[1]
    m = torch.full((n_q,), float("-inf"))
    l = torch.zeros(n_q)
    acc = torch.zeros(n_q, d)
    for n0 in range(0, scores.shape[1], block):
        m, l, acc = step(m, l, acc, scores[:, n0:n0 + block], v[n0:n0 + block])
    return m, l, acc


def test_ex10_online_softmax():
    import kernels

    online_softmax_step = answer("ex10_online_softmax").online_softmax_step
    forbid = [kernels.attention, interleave.attention, interleave.plain_attention,
              (F, "scaled_dot_product_attention")]
    n_q, n_k, d, block = 12, 40, 8, 8
    q, k, v = torch.randn(n_q, d) * 6, torch.randn(n_k, d), torch.randn(n_k, d)   # large scores: exp would overflow
    visible = torch.rand(n_q, n_k) < 0.7
    visible[0] = False                                         # a row that sees no key at all
    visible[1, :n_k - block] = False                           # a row whose first blocks are all masked...
    visible[1, -1] = True                                      # ...but not its last
    visible[2] = torch.arange(n_k) <= 2 + n_k - n_q            # causal, aligned bottom-right as after a KV cache
    scale = d ** -0.5
    scores = (q @ k.T * scale).masked_fill(~visible, float("-inf"))
    m, l, acc = torch.full((n_q,), float("-inf")), torch.zeros(n_q), torch.zeros(n_q, d)
    for n0 in range(0, n_k, block):
        got = attempt(10, online_softmax_step, m, l, acc, scores[:, n0:n0 + block], v[n0:n0 + block], forbid=forbid)
        if not (isinstance(got, tuple) and len(got) == 3):
            fail(f"online_softmax_step returned {type(got).__name__}", "return the tuple (m, l, acc)")
        for name, x, shape in zip(("m", "l", "acc"), got, ((n_q,), (n_q,), (n_q, d))):
            if not isinstance(x, torch.Tensor) or x.shape != shape:
                fail(f"online_softmax_step: {name} has shape {tuple(getattr(x, 'shape', ()))}, expected {shape}")
        m, l, acc = got

    def run(candidate):
        """A known mistake folded over the same blocks."""
        return fold_blocks(candidate, scores, v, block)

    hint = Hint("ex10_online_softmax.online_softmax_step", "scale the old l and acc by exp(m_old - m_new); a row "
                "with m = -inf must subtract 0, not -inf (NaN)", (m, l, acc), run=run)
    if not (m[0] == float("-inf") and l[0] == 0 and (acc[0] == 0).all()):
        fail(f"row 0 sees no key: expected m = -inf, l = 0, acc = 0; yours m = {m[0]:.4g}, l = {l[0]:.4g}, "
             f"acc[0] = {acc[0, 0]:.4g}", hint)
    want = interleave.plain_attention(q[None, None], k[None, None], v[None, None], visible, scale)[0, 0]
    same_tensor("attention = acc / l (rows 1-11)", acc[1:] / l[1:, None], want[1:], hint, atol=1e-5, rtol=1e-4)
    same_tensor("m + log(l), the log of the softmax denominator (rows 1-11)", m[1:] + l[1:].log(),
                scores[1:].logsumexp(-1), hint, atol=1e-4, rtol=1e-5)


def test_ex13_attention():
    import kernels

    attend = answer("ex13_attention").attend
    forbid = [interleave.visibility, interleave.plain_attention, interleave.attention, kernels.attention,
              (F, "scaled_dot_product_attention")]
    cases = [  # (B, H, Hkv, Tq, Tk, causal, cu_seqlens, dtype, what it is)
        (2, 4, 2, 6, 6, True, None, torch.float32, "decoder prefill, 2 query heads per kv head"),
        (2, 4, 1, 3, 9, True, None, torch.float32, "3 new queries after 6 cached keys"),
        (1, 4, 2, 14, 14, True, [0, 5, 9, 14], torch.float32, "3 packed samples"),
        (2, 3, 3, 7, 7, False, None, torch.float32, "vision tower: both directions"),
        (1, 2, 1, 5, 8, True, None, torch.bfloat16, "bfloat16, 5 queries after 3 cached keys"),
    ]
    general = "query head h reads kv head h // (H // Hkv); query i sees key j iff j <= i + Tk - Tq (causal) and " \
              "both are in the same sample; softmax in float32 over scores scaled by 1 / sqrt(D)"
    for b, h, hkv, tq, tk, causal, cu, dtype, name in cases:
        q = torch.randn(b, h, tq, 8).to(dtype)
        k = torch.randn(b, hkv, tk, 8).to(dtype)
        v = torch.randn(b, hkv, tk, 8).to(dtype)
        cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
        want = interleave.attention(q, k, v, causal, "plain", cu_seqlens=cu)
        got = attempt(13, attend, q, k, v, causal, cu, forbid=forbid)
        boundaries = None if cu is None else cu.tolist()
        what = f"attend(q {tuple(q.shape)}, k and v {tuple(k.shape)}, causal={causal}, cu_seqlens={boundaries}): " \
               f"{name}"
        tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
        same_tensor(what, got, want, Hint("ex13_attention.attend", general, got, q, k, v, causal, cu),
                    atol=tolerance, rtol=tolerance)


# ==== ex11, ex12: vision tower and projector

def test_ex11_vision():
    module = answer("ex11_vision")
    forbid = [interleave.VisionTower.forward, interleave.VisionBlock.forward]
    # 30-pixel images of 7-pixel patches: a 4 x 4 grid, and 2 pixel rows and columns that belong to no patch
    config = interleave.VisionConfig(hidden=12, intermediate=24, heads=3, layers=1, image_size=30, patch_size=7,
                                     feature_layer=0)   # the tower's output is then its embeddings
    tower = interleave.VisionTower(config).eval()

    def check_patches():
        pixels = torch.randn(3, 3, 30, 30)
        with torch.no_grad():
            want = tower(pixels)                                   # (3, 16, 12)
            weight = tower.patch_embedding.weight.clone()
            bias = tower.patch_embedding.bias.clone()
            position = tower.position_embedding.weight.clone()
        inputs = (pixels, weight, bias, position)
        got = attempt(11, module.patch_embed, *inputs, forbid=forbid)
        general = "F.conv2d with stride p (the leftover pixels drop out), the patches row by row, plus position"
        same_tensor("patch_embed(pixels (3, 3, 30, 30), 7 x 7 patches)", got, want,
                    Hint("ex11_vision.patch_embed", general, got, *inputs), atol=1e-5, rtol=1e-5)

    def check_block():
        block = tower.layers[0].double()   # float64: the two GELUs differ by ~1e-4, far above rounding
        with torch.no_grad():
            for parameter in block.parameters():   # the two norms must differ from each other, and from 1 and 0
                parameter.add_(torch.randn_like(parameter) / 4)
        x = torch.randn(2, 16, 12, dtype=torch.float64)
        with torch.no_grad():
            want = block(x)
            got = attempt(11, module.vision_block, block, x.clone(), forbid=forbid)
        general = "pre-norm: x + self_attn(layer_norm1(x)), then x + fc2(gelu_tanh(fc1(layer_norm2(x))))"
        same_tensor("vision_block(x (2, 16, 12), float64)", got, want,
                    Hint("ex11_vision.vision_block", general, got, block, x), atol=1e-9, rtol=1e-9)

    in_parts(11, module, [("patch_embed", check_patches), ("vision_block", check_block)])


def test_ex12_projector():
    module = answer("ex12_projector")

    def check_gelu():
        x = torch.cat([torch.linspace(-8, 8, 401), torch.randn(200) * 3]).double()
        for approximate in ("none", "tanh"):
            want = F.gelu(x, approximate=approximate)
            got = attempt(12, module.gelu, x.clone(), approximate, forbid=[(F, "gelu")])
            general = "the formula of the docstring for each form; keep x's dtype"
            same_tensor(f"gelu(x, approximate={approximate!r}) in float64", got, want,
                        Hint("ex12_projector.gelu", general, got, x, approximate), atol=1e-10, rtol=1e-10)

    def check_project():
        projector = interleave.Projector(10, 14).double()
        x = torch.randn(2, 5, 10, dtype=torch.float64) * 2
        with torch.no_grad():
            want = projector(x)
            got = attempt(12, module.project, projector, x.clone(), forbid=[interleave.Projector.forward])
        general = "linear_2(exact GELU(linear_1(x)))"
        same_tensor("project(x (2, 5, 10)) in float64", got, want,
                    Hint("ex12_projector.project", general, got, projector, x), atol=1e-9, rtol=1e-9)

    in_parts(12, module, [("gelu", check_gelu), ("project", check_project)])


# ==== ex14: the loss

class CountingHead(torch.nn.Module):
    """The model's head, counting the positions it is run on."""

    def __init__(self, head):
        super().__init__()
        self.head = head
        self.positions = 0

    def forward(self, x):
        self.positions += x.shape[:-1].numel()
        return self.head(x)


def test_ex14_loss():
    import train

    reply_loss = answer("ex14_loss").reply_loss
    model = tiny_model()
    lengths = [9, 7]   # two samples packed into one sequence
    ids = torch.randint(0, 60, (sum(lengths),))
    labels = ids.masked_fill(torch.rand(len(ids)) < 0.4, IGNORE)
    labels[0] = labels[lengths[0]] = IGNORE   # a sample's first token is never predicted
    positions = torch.cat([torch.arange(n) for n in lengths])
    cu_seqlens = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32)
    with torch.no_grad():
        want = train.WithLoss(model)(ids[None], labels, None, None, positions[None], cu_seqlens)
        hidden = model.decoder(model.embed(ids[None]), positions[None], None, 0, cu_seqlens)[0]   # (T, H)
        head = CountingHead(model.lm_head)
        got = attempt(14, reply_loss, hidden.clone(), labels.clone(), head, forbid=[train.WithLoss.forward])
    general = "hidden[:-1] against labels[1:], only where labels[1:] != IGNORE; cross-entropy summed, in float32"
    same_tensor(f"reply_loss(hidden {tuple(hidden.shape)}, labels {labels.tolist()})", got, want,
                Hint("ex14_loss.reply_loss", general, got, hidden, labels, model.lm_head), atol=1e-4, rtol=1e-5)
    needed = int((labels[1:] != IGNORE).sum())
    if head.positions != needed:
        fail(f"lm_head ran on {head.positions} positions; only the {needed} whose next token has a label need it",
             "select the positions first (hidden[:-1][keep]), then run the head")
