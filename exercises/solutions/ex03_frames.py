import numpy as np


def sample_frame_indices(total, num_frames):
    if total <= num_frames:
        return list(range(total))
    return [int(i) for i in np.linspace(0, total - 1, num_frames)]
