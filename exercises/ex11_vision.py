"""Exercise 11 (medium): the vision tower's two pieces: patch embedding and one transformer block (docs/MODEL.md §1).

Read first: LlavaInterleave.encode_images (the caller of the tower: pixels in, features out), interleave.VisionConfig
(image_size, patch_size, hidden, tokens), interleave.SelfAttention (the attention module a block holds) and
docs/MODEL.md §1, "Vision tower". Check: python -m pytest exercises -k vision
"""
import torch
import torch.nn.functional as F


def patch_embed(pixels, weight, bias, position):
    """The tower's input: one vector per patch, plus its learned position embedding.

    pixels: (N, 3, S, S) images; weight: (C, 3, p, p) and bias (C,), the checkpoint's patch_embedding, a Conv2d of
    kernel p and stride p; position: (g * g, C), one learned vector per patch, where g = S // p. When S is not a
    multiple of p, the last S - g * p pixel rows and columns belong to no patch (384 = 27 * 14 + 6).
    Each patch is mapped linearly: out = sum over (c, y, x) of weight[:, c, y, x] * patch[c, y, x], plus bias.
    Returns (N, g * g, C): the patches row by row (all patches of the top row left to right, then the next row),
    each plus position[i] for its index i in that order.
    """
    raise NotImplementedError("exercise 11: patch_embed")


def vision_block(block, x):
    """One SigLIP encoder block, pre-norm, on x (N, L, C); returns (N, L, C).

    block: an interleave.VisionBlock; use its parts, not its forward: block.layer_norm1, block.self_attn (call it
    as block.self_attn(h): attention in both directions), block.layer_norm2, block.fc1, block.fc2.
      x = x + self_attn(layer_norm1(x))
      x = x + fc2(gelu(fc1(layer_norm2(x))))   with GELU's tanh approximation (F.gelu(..., approximate="tanh"))
    """
    raise NotImplementedError("exercise 11: vision_block")
