import torch

from interleave import Sample


def pack(samples):
    lengths = [len(s.input_ids) for s in samples]
    pixels = [s.pixel_values for s in samples if s.pixel_values is not None]
    return Sample(input_ids=torch.cat([s.input_ids for s in samples]),
                  labels=torch.cat([s.labels for s in samples]),
                  pixel_values=torch.cat(pixels) if pixels else None,
                  image_sizes=[size for s in samples for size in s.image_sizes],
                  position_ids=torch.cat([torch.arange(n) for n in lengths]),
                  cu_seqlens=torch.tensor([0] + lengths).cumsum(0).to(torch.int32))
