import torch

import interleave


def merge_tiles(views, image_size, config, newline):
    _, rows, cols, (top, bottom, left, right) = interleave.multipatch_layout(image_size, config)
    s = config.vision.image_size // config.vision.patch_size
    h = views.shape[-1]
    tiles = views[1:].view(rows, cols, s, s, h)                         # (tile row, tile col, y, x, H)
    grid = tiles.permute(0, 2, 1, 3, 4).reshape(rows * s, cols * s, h)  # (Y, X, H): feature rows run across tiles
    grid = grid[top:bottom, left:right]
    ends = newline.to(grid.dtype).expand(grid.shape[0], 1, h)            # one newline per row
    return torch.cat([views[0], torch.cat([grid, ends], dim=1).flatten(0, 1)])
