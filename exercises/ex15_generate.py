"""Exercise 15 (medium): the greedy generation loop: prefill once, then one token at a time with the KV cache.

Read first: LlavaInterleave.forward (what it takes: cache, start, last_only), interleave.KVCache (its arguments),
train.py's evaluate (a caller: greedy answers to score) and docs/MODEL.md §3 (stop tokens).
Check: python -m pytest exercises -k generate
"""
import torch

import interleave


def greedy(model, input_ids, pixel_values, max_new_tokens, stop_ids):
    """The new token ids (B, n), n <= max_new_tokens, int64, decoded greedily (the most likely token each step).

    model: an interleave.LlavaInterleave in eval mode; input_ids (B, T) the prompts, with image slots filled from
    pixel_values (or None when there are no images); stop_ids: a list of token ids that end a row.
    1. Make an interleave.KVCache for T + max_new_tokens positions (layers, kv_heads, head_dim from
       model.config.text; dtype and device of the model's weights), and run the whole prompt once, with its images,
       into it (start 0): the logits of its last position give the first new token.
    2. Then for each further token: run ONLY the newest token (B, 1) at its position (start = its position), which
       reads everything before it from the cache. No pixel_values here: a new token is text.
    3. A row that has emitted a stop id keeps repeating that id while the others go on; stop as soon as every row has
       emitted one, or after max_new_tokens tokens. The stop ids are part of the output.
    Run under torch.no_grad().
    """
    raise NotImplementedError("exercise 15: greedy")
