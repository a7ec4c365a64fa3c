import torch


def rms_norm(x, weight, eps):
    x32 = x.float()
    y = x32 / torch.sqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return y.to(x.dtype) * weight
