"""Exercise 5 (easy): training labels, as the release computes them (docs/MODEL.md §5).

Read first: interleave.chat_segments (the segments you get), interleave.encode_prompt (the tokenizing you use),
interleave.record_to_sample (the caller) and train.py's WithLoss (who reads the labels).
Check: python -m pytest exercises -k labels
"""
import interleave
from interleave import IGNORE


def ids_and_labels(segments, tokenizer, image_token_id, slots_per_image):
    """Token ids and training labels of a conversation, two lists of ints of the same length.

    segments: the (text, is_reply) pairs of interleave.chat_segments: the system turn in one segment, then three
    segments per turn: its header "<|im_start|>{role}\\n", its text and <|im_end|> (is_reply for an assistant's), and
    "\\n". Tokenize each segment's text on its own with
    interleave.encode_prompt(tokenizer, text, image_token_id, slots_per_image) (each <image> becomes slots_per_image
    slots) and concatenate. The label of a token is the token id itself where the loss applies, IGNORE (-100)
    elsewhere. No shift here: the loss shifts labels by one position itself.

    The release's rule, which you write: every token of an assistant turn is labelled, header to newline; the system
    and user turns are not. Then every <|im_start|>, every <|im_end|> and every lone newline is labelled wherever it
    stands, system and user turns included. A lone newline is the one id that tokenizer.encode("\\n") gives (198 in
    Qwen's vocabulary): a token that holds two newlines, or a newline merged with a full stop, is another token. An
    image slot never gets a label (the model cannot predict pixels), not even inside a reply.

    The other rule (train.py --loss-on replies) labels the is_reply segments only: the replies and their <|im_end|>.
    The release's also teaches the template itself: after a turn's <|im_end|> come "\\n" and the next <|im_start|>.
    """
    raise NotImplementedError("exercise 5: ids_and_labels")
