"""Exercise 2 (warm-up): rotary position embedding, "rotate half" convention (docs/MODEL.md §1).

Read first: interleave.rotary_tables (what cos and sin hold, and their shapes) and SelfAttention.forward (the caller:
which tensors are rotated, and in which layout). Check: python -m pytest exercises -k rotary
"""
import torch


def apply_rotary(x, cos, sin):
    """Rotate queries or keys by their positions' angles.

    x: (B, H, T, D) with D even; cos, sin: (B, 1, T, D) from interleave.rotary_tables, where each angle appears twice,
    at dimension i and at i + D/2. Qwen2 pairs dimension i with dimension i + D/2 (the two HALVES of the head, not
    neighbours 2i, 2i + 1) and rotates each pair (a, b) = (x[i], x[i + D/2]) by its angle t:
        (a, b) -> (a cos t - b sin t,  b cos t + a sin t)
    Returns a tensor of x's shape.
    """
    raise NotImplementedError("exercise 2: apply_rotary")
