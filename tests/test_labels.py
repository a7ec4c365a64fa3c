"""Training labels as the release computes them (docs/MODEL.md §5), and the replies-only rule kept as an option.

The goldens are re-derived here from the rule as §5 states it, the way the release's `preprocess_qwen` builds a
sample: each turn encoded whole as one string, labels set turn by turn, then the structural tokens unmasked, then each
image token widened into its slots. Nothing of interleave's label code is used to make them. They are compared with
`interleave.record_to_sample` position by position, with a tokenizer that has Qwen2's ids (its vocabulary cannot be
downloaded here): byte-level BPE whose first 256 ids follow GPT-2's byte order, so that "\\n" is "Ċ" = 198 as in
Qwen2, with Qwen2's pre-tokenizer pattern and its special tokens at 151643-151646; and with the embedded model's own
tokenizer, whose newline is not 198.
"""
import json
import os

import pytest
from PIL import Image
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

import interleave
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASKED = -100
SYSTEM = "You are a helpful assistant."
QWEN2_SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<image>": 151646}
# Qwen2's pre-tokenizer pattern: a run of newlines is one piece, and so is punctuation with the newlines after it
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
CORPUS = ["You are a helpful assistant.", "user", "assistant", "Compare them\n\nnow", "Which one differs?\nName it.",
          "The second.\n\nIt is bigger.", "Yes.\nIt is red.", "What is the shape?"]

# Three records as M4-Instruct ships them: newlines of every kind in the user turns. "\n\n" after a word is one token
# (not a lone newline), "?\n" and ".\n" are one token each; "\n" between words, and after the image markers, is lone.
RECORDS = {
    "multi_turn": {"id": "turns", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is the shape?"}, {"from": "gpt", "value": "A circle."},
        {"from": "human", "value": "Compare them\n\nnow and say it\nagain"},
        {"from": "gpt", "value": "Yes.\nIt is red."},
        {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "The second.\n\nIt is bigger."}]},
    "multi_image": {"id": "images", "image": ["a.png", "b.png", "c.png"], "conversations": [
        {"from": "human", "value": "<image><image><image>\nWhich one differs?\nName it."},
        {"from": "gpt", "value": "The second.\n\nIt is bigger."}]},
    "text_only": {"id": "text", "conversations": [
        {"from": "human", "value": "Compare them\n\nnow"}, {"from": "gpt", "value": "Yes.\nIt is red."},
        {"from": "human", "value": "user said\nassistant"}, {"from": "gpt", "value": "What is the shape?"}]},
}
ROLES = {"human": "user", "gpt": "assistant"}


def gpt2_byte_tokens():
    """The 256 byte tokens in the order of GPT-2's vocabulary, which Qwen2's keeps as its ids 0-255: the printable
    bytes as themselves, then the others, in byte order, as chr(256), chr(257), ... (byte 10, "\\n", is the 199th)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = 256 - len(printable)
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(others)]


def qwen_vocabulary_tokenizer():
    """Byte-level BPE with Qwen2's ids where they matter: bytes 0-255 in GPT-2's order, a few merges learned on
    CORPUS (among them "ĊĊ", "?Ċ" and ".Ċ"), the special tokens at 151643-151646, Qwen2's pre-tokenizer."""
    split = pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated")
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Sequence([
        split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    learner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256 + 80, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    learner.train_from_iterator(CORPUS * 20, trainer)
    spec = json.loads(learner.to_str())
    # the vocabulary renumbered: the bytes first, in GPT-2's order, then the merges' results, then the specials
    vocab = {token: i for i, token in enumerate(gpt2_byte_tokens())}
    for merge in spec["model"]["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        vocab.setdefault(left + right, len(vocab))
    vocab.update(QWEN2_SPECIALS)
    spec["model"]["vocab"] = vocab
    spec["added_tokens"] = [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for token, i in QWEN2_SPECIALS.items()]
    return Tokenizer.from_str(json.dumps(spec))


def turns_of(record):
    """(role, content) of the system turn and every turn of the record."""
    return [("system", SYSTEM)] + [(ROLES[turn["from"]], turn["value"]) for turn in record["conversations"]]


def widen_images(ids, labels, image_id, slots):
    """Each image token becomes `slots` image slots, none of them labelled."""
    wide_ids, wide_labels = [], []
    for token, label in zip(ids, labels):
        if token == image_id:
            wide_ids += [image_id] * slots
            wide_labels += [MASKED] * slots
        else:
            wide_ids.append(token)
            wide_labels.append(label)
    return wide_ids, wide_labels


def release_rule(record, tokenizer, slots, newline=198):
    """input_ids and labels of a record by the release's rule (§5), from the rule alone: each turn, the system turn
    first, encoded whole as <|im_start|>{role}\\n{content}<|im_end|>\\n; an assistant turn labelled whole, the others
    masked; then every <|im_start|>, <|im_end|> and `newline` (the release writes 198) labelled wherever it stands."""
    ids, labels = [], []
    for role, content in turns_of(record):
        turn = tokenizer.encode(f"<|im_start|>{role}\n{content}<|im_end|>\n", add_special_tokens=False).ids
        ids += turn
        labels += turn if role == "assistant" else [MASKED] * len(turn)
    structural = {tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>"), newline}
    labels = [token if token in structural else label for token, label in zip(ids, labels)]
    return widen_images(ids, labels, tokenizer.token_to_id("<image>"), slots)


def replies_rule(record, tokenizer, slots):
    """The same record by the replies rule: only each reply's text and its <|im_end|> are labelled, that is an
    assistant turn without its header and without the newline that ends it."""
    header = len(tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False).ids)
    ids, labels = [], []
    for role, content in turns_of(record):
        turn = tokenizer.encode(f"<|im_start|>{role}\n{content}<|im_end|>\n", add_special_tokens=False).ids
        ids += turn
        if role == "assistant":
            labels += [MASKED] * header + turn[header:-1] + [MASKED]
        else:
            labels += [MASKED] * len(turn)
    return widen_images(ids, labels, tokenizer.token_to_id("<image>"), slots)


def assert_same_positions(name, ours, golden, tokenizer):
    """Position by position; the first difference is named with its token."""
    assert len(ours) == len(golden), f"{name}: {len(ours)} positions, the golden has {len(golden)}"
    for i, (a, b) in enumerate(zip(ours, golden)):
        assert a == b, f"{name}: position {i} is {a}, the golden {b} (token {tokenizer.id_to_token(b)!r})"


@pytest.fixture(scope="module")
def qwen():
    return qwen_vocabulary_tokenizer()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for name, colour in (("a.png", "red"), ("b.png", "blue"), ("c.png", "green")):
        Image.new("RGB", (20, 20), colour).save(folder / name)
    return folder


def qwen_config():
    """A configuration with 4 image slots per image (32-pixel images, 16-pixel patches) and Qwen2's image id."""
    vision = interleave.VisionConfig(hidden=8, intermediate=16, heads=2, layers=1, image_size=32, patch_size=16)
    return interleave.ModelConfig(vision, interleave.TextConfig(), "hf", image_token_id=QWEN2_SPECIALS["<image>"])


def test_the_test_tokenizer_has_qwen2s_ids(qwen):
    assert qwen.encode("\n").ids == [198] and qwen.token_to_id("Ċ") == 198 == interleave.newline_id(qwen)
    assert [qwen.token_to_id(token) for token in QWEN2_SPECIALS] == list(QWEN2_SPECIALS.values())
    for merged in ("them\n\nnow", "differs?\nName", "Yes.\nIt"):   # each holds a newline that is not a lone one
        ids = qwen.encode(merged).ids
        assert 198 not in ids and any("Ċ" in qwen.id_to_token(i) for i in ids), (merged, ids)


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_labels_by_default_are_the_releases(qwen, folder, name):
    config = qwen_config()
    sample = interleave.record_to_sample(RECORDS[name], str(folder), qwen, config)
    ids, labels = release_rule(RECORDS[name], qwen, config.vision.tokens)
    assert_same_positions(f"{name} input_ids", sample.input_ids.tolist(), ids, qwen)
    assert_same_positions(f"{name} labels", sample.labels.tolist(), labels, qwen)


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_labels_on_the_replies_only_as_an_option(qwen, folder, name):
    config = qwen_config()
    sample = interleave.record_to_sample(RECORDS[name], str(folder), qwen, config, loss_on="replies")
    ids, labels = replies_rule(RECORDS[name], qwen, config.vision.tokens)
    assert_same_positions(f"{name} input_ids", sample.input_ids.tolist(), ids, qwen)
    assert_same_positions(f"{name} labels", sample.labels.tolist(), labels, qwen)


def test_newlines_in_a_user_turn(qwen):
    """Stated without the golden: in a user turn a lone newline is labelled, a merged one ("\\n\\n", "?\\n") not."""
    config = qwen_config()
    turns = [("user", "Compare them\n\nnow and say it\nagain"), ("assistant", "A circle."),
             ("user", "Which one differs?\nName it.")]
    sample = interleave.build_inputs(turns, qwen, config, add_generation_prompt=False)
    ids, labels = sample.input_ids.tolist(), sample.labels.tolist()
    user_text = qwen.encode("Compare them\n\nnow and say it\nagain").ids
    start = next(i for i in range(len(ids)) if ids[i:i + len(user_text)] == user_text)
    span = slice(start, start + len(user_text))
    assert 198 in ids[span] and qwen.token_to_id("ĊĊ") in ids[span]
    assert labels[span] == [198 if token == 198 else MASKED for token in ids[span]]
    question_mark = qwen.token_to_id("?Ċ")
    assert question_mark in ids and labels[ids.index(question_mark)] == MASKED
    # the first label is the system turn's <|im_start|>, where the replies rule has none before the first reply
    assert labels[0] == QWEN2_SPECIALS["<|im_start|>"]
    replies = interleave.build_inputs(turns, qwen, config, add_generation_prompt=False, loss_on="replies")
    assert replies.labels[0] == MASKED and replies.labels[ids.index(198)] == MASKED


@pytest.mark.parametrize("loss_on", ["release", "replies"])
def test_the_embedded_models_own_tokenizer(folder, loss_on):
    """models/m4-tiny's tokenizer: its lone newline is "Ċ" = 202, and its id 198 is byte 0x06, which a user turn
    holds here and which stays masked (the release's constant 198 is Qwen's newline, not this vocabulary's)."""
    path = os.path.join(ROOT, "models", "m4-tiny")
    tokenizer = interleave.load_tokenizer(path)
    config = interleave.read_config(path)
    newline = tokenizer.token_to_id("Ċ")
    assert newline != 198 and tokenizer.id_to_token(198) == chr(256 + 6) and interleave.newline_id(tokenizer) == newline
    record = {"id": "tiny", "image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image><image>\nWhich differs?\nSay \x06 it\n\n"},
        {"from": "gpt", "value": "The second.\nA blue square."}, {"from": "human", "value": "Sure?"},
        {"from": "gpt", "value": "yes"}]}
    sample = interleave.record_to_sample(record, str(folder), tokenizer, config, loss_on=loss_on)
    slots = config.vision.tokens
    if loss_on == "release":
        ids, labels = release_rule(record, tokenizer, slots, newline=newline)
    else:
        ids, labels = replies_rule(record, tokenizer, slots)
    assert 198 in ids and tokenizer.token_to_id("ĊĊ") in ids   # byte 0x06 and "\n\n" are there, in the user turn
    assert_same_positions("input_ids", sample.input_ids.tolist(), ids, tokenizer)
    assert_same_positions("labels", sample.labels.tolist(), labels, tokenizer)


def test_packed_samples_do_not_predict_each_others_first_token(qwen, folder):
    """By the release's rule a sample's first label is its <|im_start|>, which no position of the sample predicts.
    Packed behind another sample, the loss (position t predicts labels[t + 1]) would have that sample's last position
    predict it. A pack must ask for exactly the predictions each sample asks for alone."""
    config = qwen_config()
    samples = [interleave.record_to_sample(RECORDS[name], str(folder), qwen, config) for name in sorted(RECORDS)]
    pack, = interleave.pack_samples(samples, 10_000, verbose=False)
    targets = pack.labels.tolist()
    predicted = [(t, label) for t, label in enumerate(targets) if t > 0 and label != MASKED]
    expected = []
    bounds = pack.cu_seqlens.tolist()
    for start, end in zip(bounds, bounds[1:]):
        alone = next(s for s in samples if s.input_ids.tolist() == pack.input_ids[start:end].tolist())
        expected += [(start + t, label) for t, label in enumerate(alone.labels.tolist()) if t > 0 and label != MASKED]
    assert predicted == expected
    assert all(s.labels[0] == QWEN2_SPECIALS["<|im_start|>"] for s in samples)   # the samples themselves keep theirs


def test_an_unknown_rule_is_refused(qwen, capsys):
    with pytest.raises(interleave.InputError, match="loss_on='all': the labels' rule is one of release, replies"):
        interleave.build_inputs([("user", "hi")], qwen, qwen_config(), loss_on="all")
    with pytest.raises(SystemExit) as stop:
        train.main(["--loss-on", "all", "--synthetic", "1"])
    assert "--loss-on 'all': choose one of release, replies" in str(stop.value.code)


def test_train_passes_its_option_to_the_records(qwen, folder):
    record = RECORDS["multi_image"]
    config = qwen_config()
    for rule in ("release", "replies"):
        cfg = train.Config(image_folder=str(folder), loss_on=rule)
        got, why = train.to_sample(record, cfg, qwen, config)
        assert why is None
        want = interleave.record_to_sample(record, str(folder), qwen, config, loss_on=rule)
        assert got.labels.tolist() == want.labels.tolist()
    assert train.Config().loss_on == "release"
    # the held-out evaluation reads the replies rule's labels whatever the run's rule
    cfg = train.Config(image_folder=str(folder), loss_on="release")
    held_out, why = train.to_sample(record, cfg, qwen, config, loss_on="replies")
    assert why is None
    assert held_out.labels.tolist() == replies_rule(record, qwen, config.vision.tokens)[1]


@pytest.mark.parametrize("loss_on", ["release", "replies"])
def test_a_sample_cut_before_its_first_reply_is_refused_by_either_rule(qwen, folder, loss_on):
    # By the release's rule the system and user turns hold labels too (the template's tokens); a
    # sample cut before its reply would still train, on those alone, and hide a --budget too small.
    record = RECORDS["text_only"]
    whole = interleave.record_to_sample(record, str(folder), qwen, qwen_config(), loss_on=loss_on)
    prompt = interleave.record_to_sample(record, str(folder), qwen, qwen_config(), loss_on="replies")
    first_reply = int((prompt.labels != interleave.IGNORE).nonzero()[0])
    kept = interleave.record_to_sample(record, str(folder), qwen, qwen_config(), max_len=first_reply + 1,
                                       loss_on=loss_on)
    assert kept.labels.tolist() == whole.labels[:first_reply + 1].tolist()
    with pytest.raises(interleave.InputError, match="no answer left within max_len"):
        interleave.record_to_sample(record, str(folder), qwen, qwen_config(), max_len=first_reply, loss_on=loss_on)
