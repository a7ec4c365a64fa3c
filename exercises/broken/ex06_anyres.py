"""Mistakes: non-strict comparisons (the LAST of equal canvases wins) and rounding instead of truncating in unpad."""


def select_canvas(image_size, pinpoints):
    w0, h0 = image_size
    best, best_effective, best_waste = None, 0, float("inf")
    for w, h in pinpoints:
        scale = min(w / w0, h / h0)
        effective = min(int(w0 * scale) * int(h0 * scale), w0 * h0)
        waste = w * h - effective
        if effective > best_effective or (effective == best_effective and waste <= best_waste):
            best, best_effective, best_waste = (w, h), effective, waste
    return best


def unpad(image_size, rows, cols, s):
    w0, h0 = image_size
    ch, cw = rows * s, cols * s
    if w0 / h0 > cw / ch:
        p = (ch - round(h0 * (cw / w0))) // 2
        return p, ch - p, 0, cw
    p = (cw - round(w0 * (ch / h0))) // 2
    return 0, ch, p, cw - p
