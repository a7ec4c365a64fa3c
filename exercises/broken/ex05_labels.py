"""Mistake: the replies only (train.py --loss-on replies), not the release's rule: the whole assistant turn, and
every <|im_start|>, <|im_end|> and lone newline wherever it stands."""
import interleave
from interleave import IGNORE


def ids_and_labels(segments, tokenizer, image_token_id, slots_per_image):
    ids, labels = [], []
    for text, is_reply in segments:
        piece = interleave.encode_prompt(tokenizer, text, image_token_id, slots_per_image)
        ids += piece
        labels += [t if is_reply and t != image_token_id else IGNORE for t in piece]
    return ids, labels
