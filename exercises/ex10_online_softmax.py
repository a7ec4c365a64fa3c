"""Exercise 10 (hard): the online softmax at the heart of flash attention (kernels.py).

Read first: the docstring at the top of kernels.py (the idea in words) and kernels.attention (the shapes); then the
loop of the check, test_ex10_online_softmax in exercises/test_exercises.py, which calls your step block by block.
Derive the update on paper first: what must happen to l and acc when the maximum grows?
Check: python -m pytest exercises -k online_softmax
"""
import torch


def online_softmax_step(m, l, acc, s, v):
    """Fold one block of keys into the running softmax of a block of queries; returns the new (m, l, acc).

    m: (Q,) the largest score each query has seen so far (-inf before the first block);
    l: (Q,) the running sum of exp(score - m); acc: (Q, D) the running sum of exp(score - m) * value;
    s: (Q, N) this block's scores (-inf where a key is masked); v: (N, D) this block's values.
    When a block raises a row's maximum, the old l and acc are worth less under the new one: scale them by
    exp(m_old - m_new) before adding the block. After the last block, attention = acc / l.
    A row that has seen no visible key yet keeps m = -inf, l = 0, acc = 0: no NaN (exp(-inf - -inf) is NaN).
    """
    raise NotImplementedError("exercise 10: online_softmax_step")
