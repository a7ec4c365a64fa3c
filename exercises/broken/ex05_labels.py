"""Mistake: the image slots inside a reply get a label, so the loss would ask the model to predict them."""
import interleave
from interleave import IGNORE


def ids_and_labels(segments, tokenizer, image_token_id, slots_per_image):
    ids, labels = [], []
    for text, is_reply in segments:
        piece = interleave.encode_prompt(tokenizer, text, image_token_id, slots_per_image)
        ids += piece
        labels += piece if is_reply else [IGNORE] * len(piece)
    return ids, labels
