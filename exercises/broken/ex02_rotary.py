"""Mistake: the interleaved-pairs convention (2i, 2i + 1) of GPT-J / Meta's LLaMA code, not Qwen2's rotate half."""
import torch


def apply_rotary(x, cos, sin):
    rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    return x * cos + rotated * sin
