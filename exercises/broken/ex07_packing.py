"""Mistake: the positions count on over the whole pack instead of restarting at 0 for each sample."""
import torch

from interleave import Sample


def pack(samples):
    lengths = [len(s.input_ids) for s in samples]
    pixels = [s.pixel_values for s in samples if s.pixel_values is not None]
    return Sample(torch.cat([s.input_ids for s in samples]), torch.cat([s.labels for s in samples]),
                  torch.cat(pixels) if pixels else None, [size for s in samples for size in s.image_sizes],
                  position_ids=torch.arange(sum(lengths)),
                  cu_seqlens=torch.tensor([0] + lengths).cumsum(0).to(torch.int32))
