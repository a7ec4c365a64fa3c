"""Mistake: multiplies by the weight in float32 and casts at the end (right in float32, off in bfloat16)."""
import torch


def rms_norm(x, weight, eps):
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)
