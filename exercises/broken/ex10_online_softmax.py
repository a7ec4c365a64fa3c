"""Mistake: l is rescaled to the new maximum but acc is not."""
import torch


def online_softmax_step(m, l, acc, s, v):
    m_new = torch.maximum(m, s.max(dim=-1).values)
    m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    p = torch.exp(s - m_safe[:, None])
    return m_new, l * torch.exp(m - m_safe) + p.sum(-1), acc + p @ v
