import torch

from interleave import Sample


def pack(samples, budget):
    groups, room = [], []
    for sample in sorted(samples, key=lambda s: -len(s.input_ids)):   # stable: equal lengths keep their order
        n = len(sample.input_ids)
        if n > budget:
            raise ValueError(f"a sample of {n} tokens does not fit the budget of {budget}")
        j = next((j for j, free in enumerate(room) if free >= n), None)
        if j is None:
            groups.append([])
            room.append(budget)
            j = len(groups) - 1
        groups[j].append(sample)
        room[j] -= n
    return [one_pack(group) for group in groups]


def one_pack(group):
    lengths = [len(s.input_ids) for s in group]
    pixels = [s.pixel_values for s in group if s.pixel_values is not None]
    return Sample(input_ids=torch.cat([s.input_ids for s in group]),
                  labels=torch.cat([s.labels for s in group]),
                  pixel_values=torch.cat(pixels) if pixels else None,
                  image_sizes=[size for s in group for size in s.image_sizes],
                  position_ids=torch.cat([torch.arange(n) for n in lengths]),
                  cu_seqlens=torch.tensor([0] + lengths).cumsum(0).to(torch.int32))
