"""Exercise 3 (warm-up): which frames of a video become images (docs/MODEL.md §4, the video scenario).

Read first: interleave.read_video_frames (the caller: what total and num_frames are there) and docs/MODEL.md §4
(the video scenario). Check: python -m pytest exercises -k frames
"""
import numpy as np


def sample_frame_indices(total, num_frames):
    """The indices (a list of ints) of num_frames frames spread uniformly over a video of `total` frames.

    As the official demo: np.linspace from the first frame (0) to the LAST frame (total - 1), num_frames values,
    truncated to integers (dtype=int). A video with no more than num_frames frames gives all of them: 0 .. total - 1.
    Example: sample_frame_indices(100, 4) == [0, 33, 66, 99].
    """
    raise NotImplementedError("exercise 3: sample_frame_indices")
