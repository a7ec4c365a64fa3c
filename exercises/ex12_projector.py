"""Exercise 12 (warm-up): GELU in its two forms, and the projector that uses the exact one (docs/MODEL.md §1).

Read first: LlavaInterleave.encode_images (the caller: tower features in, slot vectors out), interleave.VisionBlock
(the tanh GELU of the tower) and docs/MODEL.md §1, "Projector" (the trap).
Check: python -m pytest exercises -k projector
"""
import math

import torch


def gelu(x, approximate):
    """GELU from its formula, without torch's F.gelu or nn.GELU (they refuse to run during the check).

    approximate "none", the exact form: 0.5 * x * (1 + erf(x / sqrt(2)))                (torch.erf)
    approximate "tanh":                 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))
    Returns a tensor of x's shape and dtype.
    """
    raise NotImplementedError("exercise 12: gelu")


def project(projector, x):
    """The projector ("mlp2x_gelu") on vision features x (..., C): linear_1, the EXACT GELU, linear_2.

    projector: an interleave.Projector; use its parts projector.linear_1 and projector.linear_2, not its forward.
    Your gelu above, or F.gelu, may do the activation. Returns (..., H), one decoder-width vector per feature.
    """
    raise NotImplementedError("exercise 12: project")
