"""Exercise 14 (easy): the training loss: shift the labels by one, keep only the labelled positions (docs/MODEL.md §5).

Read first: interleave.build_inputs (labels are NOT shifted there: IGNORE where there is no loss), the training step in
train.py's train (the caller of the loss: it divides by the labelled tokens of the whole step) and
LlavaInterleave.forward (hidden states and the head). Check: python -m pytest exercises -k loss
"""
import torch
import torch.nn.functional as F

from interleave import IGNORE


def reply_loss(hidden, labels, lm_head):
    """The summed cross-entropy of a sequence's next-token predictions where there is a label.

    hidden: (T, H) the decoder's output for one (packed) sequence; labels: (T,) the token id where the loss applies,
    IGNORE (-100) elsewhere, NOT shifted: labels[t] is the token at position t. lm_head: the model's head, a module
    that maps (n, H) to logits (n, vocab).
    Position t predicts the token at t + 1, so hidden[t] is scored against labels[t + 1]. Run lm_head ONLY on the
    positions whose next label is not IGNORE (with the releases' 152k vocabulary, the logits of every position of a
    long pack would outweigh the model), compute the logits' cross-entropy in float32, and return the SUM (a scalar
    tensor), not the mean: the caller divides by the labelled tokens of the whole step.
    """
    raise NotImplementedError("exercise 14: reply_loss")
