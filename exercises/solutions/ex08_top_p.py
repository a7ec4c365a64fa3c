import torch


def top_p_filter(logits, top_p):
    probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
    before = probs.cumsum(-1) - probs              # the total probability of the more likely tokens
    keep_sorted = before < top_p
    keep_sorted[:, 0] = True                       # the most likely token, even with top_p = 0
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))
