"""Exercise 1 (warm-up): RMSNorm, the normalisation of every Qwen2 decoder block (docs/MODEL.md §1).

Read first: interleave.DecoderBlock and interleave.Decoder (where the norms sit, what they receive: the residual
stream (B, T, H) in the model's dtype), docs/MODEL.md §1 (the trap). Check: python -m pytest exercises -k rmsnorm
"""
import torch


def rms_norm(x, weight, eps):
    """Normalise x over its last dimension by its root mean square, then scale by weight.

    x: (..., D) in any float dtype (float32, bfloat16, ...); weight: (D,) in x's dtype; eps: e.g. 1e-6.
    1. compute in float32: y = x / sqrt(mean(x^2 over the last dim) + eps)
    2. cast y back to x's dtype
    3. only THEN multiply by weight (in bfloat16 the order changes the rounding, and the checkpoints expect this one)
    Returns a tensor of x's shape and dtype.
    """
    raise NotImplementedError("exercise 1: rms_norm")
