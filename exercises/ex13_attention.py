"""Exercise 13 (medium): grouped-query attention with the visibility mask: causal aligned bottom-right, and packed
samples that never see each other (docs/MODEL.md §1, §5).

Read first: SelfAttention.forward (the caller: the shapes of q, k, v; when Tq < Tk), LlavaInterleave.generate (why the
queries can be fewer than the keys), interleave.pack_samples (what cu_seqlens holds) and kernels.attention's docstring
(the same rules in words). Check: python -m pytest exercises -k attention
"""
import torch


def attend(q, k, v, causal, cu_seqlens=None):
    """softmax(q k^T / sqrt(D), over the visible keys) v, per batch row and per query head.

    q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) with H a multiple of Hkv (grouped-query attention): query head h reads
    key/value head h // (H // Hkv), so consecutive query heads share one key/value head.
    Which keys a query sees:
      - causal: the Tq queries are the LAST Tq of the Tk positions (after a KV cache, Tq < Tk), so query i sees key j
        iff j <= i + (Tk - Tq) (the causal mask aligned to the bottom-right corner); not causal: every key.
      - cu_seqlens (n + 1,) int, only with B = 1 and Tq == Tk: the sample boundaries [0, T_0, T_0 + T_1, ..., T] of
        a packed sequence; a query sees only keys of its own sample (and, if causal, not after itself).
    Compute the scores and the softmax in float32; return (B, H, Tq, D) in q's dtype.
    Not allowed: torch's F.scaled_dot_product_attention and the project's attention functions (they refuse to run).
    """
    raise NotImplementedError("exercise 13: attend")
