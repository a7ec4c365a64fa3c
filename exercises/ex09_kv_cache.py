"""Exercise 9 (hard): the KV cache that makes generation fast (one new token per step, not the whole sequence).

Read first: SelfAttention.forward (the caller of update: what it passes, what it does with the result),
LlavaInterleave.generate (who makes the cache, and with which start) and interleave.visibility (causal masks aligned
bottom-right). Check: python -m pytest exercises -k kv_cache
"""
import torch


class KVCache:
    """The keys and values of every decoder layer, preallocated for max_len positions."""

    def __init__(self, layers, batch, kv_heads, max_len, head_dim, dtype, device):
        """Allocate room for the keys and the values: layers x (batch, kv_heads, max_len, head_dim) each."""
        raise NotImplementedError("exercise 9: KVCache")

    def update(self, layer, start, k, v):
        """Store the keys and values k, v (batch, kv_heads, T, head_dim) of positions start .. start + T - 1 of
        `layer`, and return that layer's keys and values of ALL positions so far, 0 .. start + T - 1: two tensors
        (batch, kv_heads, start + T, head_dim). Attention then runs over them."""
        raise NotImplementedError("exercise 9: KVCache.update")
