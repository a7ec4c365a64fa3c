"""Mistake: off by one, linspace up to `total` (one past the last frame) instead of total - 1."""
import numpy as np


def sample_frame_indices(total, num_frames):
    if total <= num_frames:
        return list(range(total))
    return np.linspace(0, total, num_frames, dtype=int).tolist()
