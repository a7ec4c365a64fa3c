"""Tokenizer glue, the ChatML template, image-slot splicing and the token pickers of generation."""
import os

import pytest
import torch
import interleave
from helpers import GOLDENS, write_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=400)


def test_chat_template_is_qwen_1_5_chatml():
    assert interleave.chat_prompt("<image><image>\nWhat changed?") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image><image>\nWhat changed?"
        "<|im_end|>\n<|im_start|>assistant\n")
    turns = [("user", "<image>\nHi"), ("assistant", "Hello."), ("user", "More?")]
    assert interleave.chat_prompt(turns).endswith(
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nMore?<|im_end|>\n<|im_start|>assistant\n")


def test_prompt_pieces_are_tokenized_apart_with_slots_between(tokenizer_folder):
    tok = interleave.load_tokenizer(tokenizer_folder)
    text = interleave.chat_prompt("<image> and <image>\nCompare the two pictures")
    ids = interleave.encode_prompt(tok, text, 999, [3, 5])
    first, middle, last = text.split("<image>")
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids
    assert ids == enc(first) + [999] * 3 + enc(middle) + [999] * 5 + enc(last)
    assert ids[:1] == [tok.token_to_id("<|im_start|>")]            # special tokens are single ids, no BOS
    assert ids.count(tok.token_to_id("<|im_end|>")) == 2
    assert interleave.encode_prompt(tok, "<image>", 7, 4) == [7] * 4
    with pytest.raises(ValueError, match="2 <image> markers but 3 images"):
        interleave.encode_prompt(tok, text, 999, [1, 2, 3])


def test_tokenizer_errors(tmp_path):
    with pytest.raises(interleave.CheckpointError, match="no tokenizer.json"):
        interleave.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(interleave.CheckpointError, match="not a valid tokenizer file"):
        interleave.load_tokenizer(tmp_path)


@pytest.fixture(scope="module")
def model():
    return interleave.load(os.path.join(GOLDENS, "untied", "original"))


def test_splice_puts_image_features_in_slot_order(model):
    pixels = torch.randn(2, 3, 120, 120)
    slot = model.config.image_token_id
    ids = torch.tensor([[5] + [slot] * 64 + [6, 7] + [slot] * 64 + [8]])
    x = model.embed(ids, pixels)
    features = model.encode_image(pixels)
    assert torch.equal(x[0, 1:65], features[:64]) and torch.equal(x[0, 67:131], features[64:])
    assert torch.equal(x[0, [0, 65, 66, 131]], model.decoder.embed_tokens(torch.tensor([5, 6, 7, 8])))


def test_splice_errors_name_both_counts(model):
    slot = model.config.image_token_id
    with pytest.raises(ValueError, match="65 image slots but the images give 64 features"):
        model(torch.tensor([[1] + [slot] * 65]), torch.randn(1, 3, 120, 120))
    with pytest.raises(ValueError, match="64 image slots but no pixel_values"):
        model(torch.tensor([[1] + [slot] * 64]))
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(N, 3, 120, 120\)"):
        model(torch.tensor([[1] + [slot] * 64]), torch.randn(1, 3, 384, 384))
    with pytest.raises(ValueError, match="image_sizes describe 19 views but pixel_values hold 1"):
        model(torch.tensor([[1] + [slot] * 64]), torch.randn(1, 3, 120, 120), image_sizes=[(30, 20)])
    with pytest.raises(ValueError, match="outside \\[0, 320\\)"):
        model(torch.tensor([[1, 320]]))


def test_generation_stops_and_pads_with_the_stop_id(model):
    ids = torch.randint(0, 300, (2, 10))
    free = model.generate(ids, max_new_tokens=6, stop_ids=()).tolist()
    stop = free[0][2]                                                # row 0 emits it at step 2
    stopped = model.generate(ids, max_new_tokens=6, stop_ids=(stop,)).tolist()
    ends = [row.index(stop) + 1 if stop in row else 6 for row in free]
    assert len(stopped[0]) == max(ends)                              # the run ends when every row has stopped
    for row, free_row, end in zip(stopped, free, ends):
        assert row == free_row[:end] + [stop] * (len(row) - end)     # a stopped row repeats its stop id
    with pytest.raises(ValueError, match="exceeds the context of 4096 positions"):
        model.generate(ids, max_new_tokens=4090)
    with pytest.raises(ValueError, match="cuda_graph=True needs use_cache=True"):   # not silently the uncached path
        model.generate(ids, max_new_tokens=2, use_cache=False, cuda_graph=True)


def test_token_pickers():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    seq = torch.tensor([[0, 3, 999]])                                # 999: an image slot, never penalised
    assert interleave.next_token(logits, seq).item() == 0
    # repetition penalty divides positive logits, multiplies negative ones: 2/2.5 = 0.8 < 1.0
    assert interleave.next_token(logits, seq, repetition_penalty=2.5, image_token_id=999).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = [interleave.next_token(logits, seq, temperature=1.0, top_k=2, generator=g).item() for _ in range(200)]
    assert set(draws) == {0, 1}                                      # top-k keeps exactly the two best
    p = logits.softmax(-1)[0]                                        # top-p 0.8: 0 (0.61) + 1 (0.23) reach 0.8
    assert p[0] < 0.8 < p[0] + p[1]
    draws = [interleave.next_token(logits, seq, temperature=1.0, top_p=0.8, generator=g).item() for _ in range(200)]
    assert set(draws) == {0, 1}
    draws = [interleave.next_token(logits, seq, temperature=1.0, top_p=0.5, generator=g).item() for _ in range(50)]
    assert set(draws) == {0}                                         # the top token always stays
