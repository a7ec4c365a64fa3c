import torch


def online_softmax_step(m, l, acc, s, v):
    m_new = torch.maximum(m, s.max(dim=-1).values)
    m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)   # a row with no key yet: exp(-inf) = 0
    p = torch.exp(s - m_safe[:, None])
    alpha = torch.exp(m - m_safe)
    return m_new, l * alpha + p.sum(-1), acc * alpha[:, None] + p @ v
