import torch.nn.functional as F

from interleave import IGNORE


def reply_loss(hidden, labels, lm_head):
    targets = labels[1:]                      # position t predicts the token at t + 1
    keep = targets != IGNORE
    logits = lm_head(hidden[:-1][keep]).float()
    return F.cross_entropy(logits, targets[keep], reduction="sum")
