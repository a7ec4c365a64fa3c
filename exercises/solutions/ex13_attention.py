import torch


def attend(q, k, v, causal, cu_seqlens=None):
    tq, tk = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)                            # (B, H, Tk, D): head h reads kv head h // group
    v = v.repeat_interleave(group, dim=1)
    scores = q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5   # (B, H, Tq, Tk)
    visible = torch.ones(tq, tk, dtype=torch.bool)
    if causal:
        visible = visible.tril(tk - tq)                              # query i sees key j iff j <= i + tk - tq
    if cu_seqlens is not None:
        sample = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), cu_seqlens.diff())   # (T,)
        visible = visible & (sample[:, None] == sample[None, :])
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return (probs @ v.float()).to(q.dtype)
