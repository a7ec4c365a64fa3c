import torch


def apply_rotary(x, cos, sin):
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    rotated = torch.cat([-b, a], dim=-1)   # the pair (a, b) turned by 90 degrees
    return x * cos + rotated * sin
