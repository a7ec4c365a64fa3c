"""Mistake: the tiles' features are laid out tile after tile (each tile flattened whole) instead of as one grid
whose feature rows run across the tiles of a row."""
import torch

import interleave


def merge_tiles(views, image_size, config, newline):
    _, rows, cols, (top, bottom, left, right) = interleave.multipatch_layout(image_size, config)
    s, h = config.vision.image_size // config.vision.patch_size, views.shape[-1]
    grid = views[1:].reshape(rows * s, cols * s, h)
    grid = grid[top:bottom, left:right]
    ends = newline.to(grid.dtype).expand(grid.shape[0], 1, h)
    return torch.cat([views[0], torch.cat([grid, ends], dim=1).flatten(0, 1)])
