"""Mistake: drops the token whose cumulative probability crosses top_p (one token too few: the boundary is off)."""
import torch


def top_p_filter(logits, top_p):
    probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
    drop_sorted = probs.cumsum(-1) > top_p
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
