"""Exercise 6 (medium): multi-patch ("anyres"): choose the canvas, unpad the tile features (docs/MODEL.md §4.1, §4.5).

Read first: interleave.multipatch_views (who needs the canvas), interleave.image_slots (who needs the unpadded
grid), docs/MODEL.md §4 steps 1 and 5.
Check: python -m pytest exercises -k anyres
"""


def select_canvas(image_size, pinpoints):
    """The canvas (width, height) of pinpoints that one image of image_size = (w0, h0) is fitted onto.

    For each candidate (W, H), in the given order: scale = min(W / w0, H / h0);
    effective = min(int(w0 * scale) * int(h0 * scale), w0 * h0); waste = W * H - effective.
    Keep the candidate with the largest effective; on a tie, the smaller waste; on a tie of both, the FIRST one
    (use strict comparisons). Returns the tuple (W, H).
    """
    raise NotImplementedError("exercise 6: select_canvas")


def unpad(image_size, rows, cols, s):
    """The part (top, bottom, left, right) of the tiles' feature grid that keeps the image, not its black border.

    The tiles form a grid of rows x cols tiles of s x s features: ch = rows * s high, cw = cols * s wide.
    With (w0, h0) = image_size: if w0 / h0 > cw / ch (the image is wider than the grid), black bands lie above and
    below: new = int(h0 * (cw / w0)) (plain truncation of the float, as the release does), p = (ch - new) // 2 and
    the result is (p, ch - p, 0, cw). Otherwise the bands are left and right: new = int(w0 * (ch / h0)),
    p = (cw - new) // 2, result (0, ch, p, cw - p).
    """
    raise NotImplementedError("exercise 6: unpad")
