"""Mistake: update returns only the new keys and values, so a decoding step attends to itself alone."""
import torch


class KVCache:
    def __init__(self, layers, batch, kv_heads, max_len, head_dim, dtype, device):
        self.k = torch.zeros(layers, batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, layer, start, k, v):
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return k, v
