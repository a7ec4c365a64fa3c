"""Cheat: torch's GELU and the projector's own forward."""
import torch.nn.functional as F


def gelu(x, approximate):
    return F.gelu(x, approximate=approximate)


def project(projector, x):
    return projector(x)
