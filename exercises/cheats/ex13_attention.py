"""Cheat: the project's attention, plain path."""
import interleave


def attend(q, k, v, causal, cu_seqlens=None):
    return interleave.attention(q, k, v, causal, "plain", cu_seqlens=cu_seqlens)
