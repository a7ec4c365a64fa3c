import torch.nn.functional as F


def patch_embed(pixels, weight, bias, position):
    x = F.conv2d(pixels, weight, bias, stride=weight.shape[-1])   # (N, C, g, g): the leftover pixels are dropped
    return x.flatten(2).transpose(1, 2) + position                # (N, g*g, C), row-major patches


def vision_block(block, x):
    x = x + block.self_attn(block.layer_norm1(x))
    return x + block.fc2(F.gelu(block.fc1(block.layer_norm2(x)), approximate="tanh"))
