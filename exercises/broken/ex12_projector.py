"""Mistake: the projector uses the tanh GELU of the vision tower, not the exact one; gelu itself is right."""
import math

import torch


def gelu(x, approximate):
    if approximate == "tanh":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def project(projector, x):
    return projector.linear_2(gelu(projector.linear_1(x), "tanh"))
