"""Exercise 5 (easy): training labels, the loss only on the assistant's replies (docs/MODEL.md §5).

Read first: interleave.chat_segments (the segments you get), interleave.encode_prompt (the tokenizing you use),
interleave.record_to_sample (the caller) and train.py's WithLoss (who reads the labels).
Check: python -m pytest exercises -k labels
"""
import interleave
from interleave import IGNORE


def ids_and_labels(segments, tokenizer, image_token_id, slots_per_image):
    """Token ids and training labels of a conversation, two lists of ints of the same length.

    segments: the (text, is_reply) pairs of interleave.chat_segments; is_reply marks an assistant reply and its
    <|im_end|>. Tokenize each segment's text on its own with
    interleave.encode_prompt(tokenizer, text, image_token_id, slots_per_image) (each <image> becomes slots_per_image
    slots) and concatenate. The label of a token is the token id itself where the loss applies, IGNORE (-100)
    elsewhere. The loss applies to the tokens of the replies only, and never to an image slot (the model cannot
    predict pixels), even one inside a reply. No shift here: the loss shifts labels by one position itself.
    """
    raise NotImplementedError("exercise 5: ids_and_labels")
