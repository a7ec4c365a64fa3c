"""Mistakes: the block uses the exact GELU (the projector's) instead of the tower's tanh approximation; the patch
embedding is right."""
import torch.nn.functional as F


def patch_embed(pixels, weight, bias, position):
    x = F.conv2d(pixels, weight, bias, stride=weight.shape[-1])
    return x.flatten(2).transpose(1, 2) + position


def vision_block(block, x):
    x = x + block.self_attn(block.layer_norm1(x))
    return x + block.fc2(F.gelu(block.fc1(block.layer_norm2(x))))
