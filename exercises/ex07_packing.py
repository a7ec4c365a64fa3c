"""Exercise 7 (medium): pack training samples into sequences of a token budget (docs/MODEL.md §5).

Read first: train.py's train (the caller: what it does with each pack), interleave.Sample (the fields),
interleave.visibility and LlavaInterleave.forward (who reads position_ids and cu_seqlens).
Check: python -m pytest exercises -k packing
"""
import torch

from interleave import Sample


def pack(samples, budget):
    """The samples packed into sequences ("packs") of at most budget tokens by the rule below; a list of Samples.

    samples: Samples with input_ids, labels (T_i,), pixel_values (views_i, 3, S, S) or None (a text-only sample),
    image_sizes (a list, empty without images). budget: the most tokens a pack may hold.

    1. Which sample goes in which pack ("first fit, longest first"): go through the samples from the longest to the
       shortest (samples of equal length in their given order); put each into the FIRST pack that still has room for
       all of it, or, if none has, into a new pack at the end. Within a pack the samples stay in the order they were
       put in. A sample longer than budget raises ValueError (it must be truncated first).
    2. Each pack is one Sample: input_ids and labels concatenated, pixel_values concatenated over its samples that
       have images (None if none has), image_sizes concatenated, and two more fields, so that its samples never see
       each other in attention and each starts afresh:
         position_ids: (T,) int64, restarting at 0 at the start of each sample;
         cu_seqlens: (n + 1,) int32, where its n samples start and end: [0, T_0, T_0 + T_1, ..., T].
    Returns the packs in the order they were opened.
    """
    raise NotImplementedError("exercise 7: pack")
