"""Mistake: every batch row starts again at features[0] instead of continuing where the previous row stopped."""


def splice_images(text_embeds, input_ids, image_token_id, features):
    if int((input_ids == image_token_id).sum()) != len(features):
        raise ValueError("slot count and feature count differ")
    out = text_embeds.clone()
    for row in range(len(input_ids)):
        where = (input_ids[row] == image_token_id).nonzero()[:, 0]
        out[row, where] = features[:len(where)].to(out.dtype)
    return out
