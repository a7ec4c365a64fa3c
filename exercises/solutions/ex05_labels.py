import interleave
from interleave import IGNORE


def ids_and_labels(segments, tokenizer, image_token_id, slots_per_image):
    everywhere = {tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")}
    newline = tokenizer.encode("\n").ids
    if len(newline) == 1:
        everywhere.add(newline[0])
    ids, labels = [], []
    assistant = False
    for text, _ in segments:
        if text.startswith("<|im_start|>"):   # a header opens a turn (the system's segment is its whole turn)
            assistant = text.startswith("<|im_start|>assistant\n")
        piece = interleave.encode_prompt(tokenizer, text, image_token_id, slots_per_image)
        ids += piece
        labels += [t if t != image_token_id and (assistant or t in everywhere) else IGNORE for t in piece]
    return ids, labels
