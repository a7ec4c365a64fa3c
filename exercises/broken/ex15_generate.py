"""Mistake: the new token is run at start = its position + 1, so its rotary angle and cache slot are one off."""
import torch

import interleave


@torch.no_grad()
def greedy(model, input_ids, pixel_values, max_new_tokens, stop_ids):
    b, t = input_ids.shape
    c, weight = model.config.text, model.lm_head.weight
    cache = interleave.KVCache(c.layers, b, c.kv_heads, t + max_new_tokens + 1, c.head_dim, weight.dtype,
                               weight.device)
    logits = model(input_ids, pixel_values, cache=cache)[:, -1]
    finished, new = torch.zeros(b, dtype=torch.bool), []
    for step in range(max_new_tokens):
        token = logits.argmax(-1)
        if new:
            token = torch.where(finished, new[-1], token)
        new.append(token)
        finished |= torch.isin(token, torch.tensor(stop_ids, dtype=torch.long))
        if finished.all() or step == max_new_tokens - 1:
            break
        logits = model(token[:, None], cache=cache, start=t + step + 1)[:, -1]
    return torch.stack(new, dim=1)
