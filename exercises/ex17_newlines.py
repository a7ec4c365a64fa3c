"""Exercise 17 (hard): a multi-patch image's features: base view first, then the tile grid, unpadded, with an
image_newline vector closing every row (docs/MODEL.md §4 steps 3 to 6).

Read first: LlavaInterleave.encode_images (the caller: how views are split per image), interleave.multipatch_views
(how the tiles were cut: row-major) and interleave.multipatch_layout (what it returns).
Check: python -m pytest exercises -k newlines
"""
import torch

import interleave


def merge_tiles(views, image_size, config, newline):
    """The slot vectors of ONE multi-patch image, in slot order: (s * s + rows' * (cols' + 1), H).

    views: (1 + rows * cols, s * s, H), the projected features of the base view, then of the tiles row by row (each
    tile's s * s features row by row), with s = config.vision.image_size // config.vision.patch_size;
    image_size: the image's (w, h); newline: (H,) the image_newline vector.
    _, rows, cols, (top, bottom, left, right) = interleave.multipatch_layout(image_size, config) gives the tile grid
    and the part of its (rows * s, cols * s) feature grid to keep.
    1. Lay the tiles' features out as ONE grid of rows * s feature rows and cols * s feature columns, as the pixels
       lay on the canvas (feature row y of tile row r is grid row r * s + y).
    2. Keep grid rows top .. bottom - 1 and columns left .. right - 1 (unpad: drop the black border).
    3. Append newline as one more column at the end of every row; flatten row by row.
    4. The base view's s * s vectors go first.
    """
    raise NotImplementedError("exercise 17: merge_tiles")
