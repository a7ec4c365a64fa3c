"""Mistake: the causal mask aligned top-left (tril(0)), right only when there are as many queries as keys."""
import torch


def attend(q, k, v, causal, cu_seqlens=None):
    tq, tk = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5
    visible = torch.ones(tq, tk, dtype=torch.bool)
    if causal:
        visible = visible.tril()
    if cu_seqlens is not None:
        sample = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), cu_seqlens.diff())
        visible = visible & (sample[:, None] == sample[None, :])
    return (scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v.float()).to(q.dtype)
