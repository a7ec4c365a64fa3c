def splice_images(text_embeds, input_ids, image_token_id, features):
    slots = (input_ids == image_token_id).nonzero()   # (N, 2): (row, column) pairs in row-major order
    if len(slots) != len(features):
        raise ValueError(f"{len(slots)} image slots but {len(features)} feature vectors")
    out = text_embeds.clone()
    out[slots[:, 0], slots[:, 1]] = features.to(out.dtype)
    return out
