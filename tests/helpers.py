"""Shared by the tests: a tiny tokenizer, paths to the committed golden checkpoints, the parity rule."""
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

GOLDENS = os.path.join(os.path.dirname(__file__), "goldens")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def golden_path(*parts):
    return os.path.join(GOLDENS, *parts)


def max_diff(ours, ref):
    """(max |diff|, bound) of the parity rule against the reference implementation's golden values."""
    return (ours - ref).abs().max().item(), 1e-5 + 2e-6 * ref.abs().max().item()


def write_tiny_tokenizer(folder, vocab_size=300):
    """A Qwen2-style byte-level BPE tokenizer.json (the real one cannot be downloaded here). Its ids stay below
    vocab_size, so they fit the tiny checkpoints' 320-row embedding."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["You are a helpful assistant. Compare the two pictures, what changed?"] * 20, trainer)
    tok.save(os.path.join(folder, "tokenizer.json"))
    return folder
