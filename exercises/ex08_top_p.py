"""Exercise 8 (medium): the top-p (nucleus) sampling filter (the releases sample with top_p 0.8, docs/MODEL.md §3).

Read first: LlavaInterleave.generate (the caller: the logits it samples from, one row per sequence) and
docs/MODEL.md §3 (the released sampling settings). Check: python -m pytest exercises -k top_p
"""
import torch


def top_p_filter(logits, top_p):
    """Logits (B, V) with the unlikely tail removed: every dropped token's logit becomes -inf.

    Probabilities are softmax(logits) per row. A token stays if the tokens MORE likely than it have a total
    probability below top_p (strictly), so the token that crosses top_p stays too. The most likely token always
    stays, even with top_p = 0. 0 <= top_p < 1. Returns a new float tensor of logits' shape.
    Example: probabilities [0.5, 0.3, 0.2], top_p 0.6: keep the first two (only 0.5 is more likely than the second).
    """
    raise NotImplementedError("exercise 8: top_p_filter")
