"""Mistake: no shift: position t is scored against the token at t itself, not the next one."""
import torch.nn.functional as F

from interleave import IGNORE


def reply_loss(hidden, labels, lm_head):
    keep = labels != IGNORE
    return F.cross_entropy(lm_head(hidden[keep]).float(), labels[keep], reduction="sum")
