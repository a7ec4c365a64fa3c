def select_canvas(image_size, pinpoints):
    w0, h0 = image_size
    best, key = None, None
    for w, h in pinpoints:
        scale = min(w / w0, h / h0)
        effective = min(int(w0 * scale) * int(h0 * scale), w0 * h0)
        candidate = (effective, -(w * h - effective))   # more effective first, then less waste
        if key is None or candidate > key:              # strict: the first of equals wins
            best, key = (w, h), candidate
    return best


def unpad(image_size, rows, cols, s):
    w0, h0 = image_size
    ch, cw = rows * s, cols * s
    if w0 / h0 > cw / ch:
        p = (ch - int(h0 * (cw / w0))) // 2
        return p, ch - p, 0, cw
    p = (cw - int(w0 * (ch / h0))) // 2
    return 0, ch, p, cw - p
