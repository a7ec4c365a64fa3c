"""Exercise 7 (medium): pack several training samples into one sequence (docs/MODEL.md §5).

Read first: interleave.pack_samples, interleave.visibility. Check: python -m pytest exercises -k packing
"""
import torch

from interleave import Sample


def pack(samples):
    """One interleave.Sample holding the given samples one after another, in the given order.

    samples: Samples with input_ids, labels (T_i,), pixel_values (views_i, 3, S, S) or None, image_sizes (a list).
    The packed Sample has input_ids and labels concatenated, pixel_values concatenated over the samples that have
    images (None if none has), image_sizes concatenated, and two more fields, so that the samples never see each
    other in attention and each starts afresh:
      position_ids: (T,) int64, restarting at 0 at the start of each sample;
      cu_seqlens: (n + 1,) int32, where the samples start and end: [0, T_0, T_0 + T_1, ..., T].
    """
    raise NotImplementedError("exercise 7: pack")
