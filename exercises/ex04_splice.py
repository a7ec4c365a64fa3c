"""Exercise 4 (easy): splice the image features into the token stream (docs/MODEL.md §3).

Read first: LlavaInterleave.forward (the caller), LlavaInterleave.encode_images (the features and their order) and
interleave.build_inputs (where the slots come from). Check: python -m pytest exercises -k splice
"""
import torch


def splice_images(text_embeds, input_ids, image_token_id, features):
    """The decoder's input: the token embeddings, with every image slot replaced by one image feature vector.

    text_embeds: (B, T, H) embeddings of the tokens (at the slots they hold a placeholder, to be overwritten).
    input_ids: (B, T), equal to image_token_id at every image slot.
    features: (N, H) the projected vectors of all images, in slot order; N must be the number of slots.
    The k-th slot, counting row by row (batch row 0 from left to right, then row 1, ...), gets features[k].
    Returns a new (B, T, H) tensor in text_embeds' dtype; every other position keeps its embedding.
    Raises ValueError when N is not the number of slots (a prompt whose <image> markers do not match the images).
    """
    raise NotImplementedError("exercise 4: splice_images")
