"""Staged hints, on request: EXERCISE_HINT=1 python -m pytest exercises -k rotary prints the first one (a nudge),
EXERCISE_HINT=2 also the second (the idea), EXERCISE_HINT=3 also the third (where the project does it: read it after
you are done, or when you give up). exercises/conftest.py prints them for each exercise run that is not right yet.
"""
HINTS = {
    "ex01_rmsnorm": [
        "Three steps, and the order of the last two is the whole trap: normalise, cast back, scale.",
        "y = x.float() * torch.rsqrt(mean of x.float()**2 over dim -1, keepdim, + eps); then y.to(x.dtype) * weight. "
        "In bfloat16, multiplying before the cast rounds differently.",
        "interleave.RMSNorm.forward; docs/MODEL.md §1.",
    ],
    "ex02_rotary": [
        "Write a pair (a, b) as the complex number a + ib: a rotation by t is a multiplication by cos t + i sin t. "
        "Which dimensions form a pair here?",
        "a = x[..., :D/2], b = x[..., D/2:]; the result is x * cos + cat([-b, a]) * sin: cos and sin already hold "
        "each angle twice, once per half.",
        "interleave.apply_rotary; interleave.rotary_tables makes cos and sin.",
    ],
    "ex03_frames": [
        "Work the example by hand: 100 frames, 4 wanted -> 0, 33, 66, 99. Which frame is the last one?",
        "np.linspace(0, total - 1, num_frames, dtype=int) truncates; a short video gives list(range(total)).",
        "interleave.sample_frame_indices.",
    ],
    "ex04_splice": [
        "Number the slots 0, 1, 2, ... reading the batch like a book: row 0 left to right, then row 1, ...",
        "(input_ids == image_token_id).nonzero() lists the slots in exactly that order; clone text_embeds and assign "
        "features to those (row, column) pairs; check the count first.",
        "LlavaInterleave.embed (one masked_scatter does it).",
    ],
    "ex05_labels": [
        "Two lists grow together, one segment at a time: the ids of the segment, and for each id its label. Which "
        "turn is the segment in?",
        "A segment that starts with <|im_start|> opens a turn: remember whether it is the assistant's. label = the id "
        "if it is not an image slot and (the turn is the assistant's, or the id is <|im_start|>, <|im_end|> or "
        "tokenizer.encode('\\n')'s one id), else IGNORE.",
        "interleave.build_inputs, the loop over the segments, then interleave.unmask_everywhere.",
    ],
    "ex06_anyres": [
        "select_canvas: one loop over the candidates, keeping the best so far. unpad: which way does the image's "
        "aspect ratio differ from the grid's?",
        "Compare (effective, then -waste) with strict >, so the first of equals stays. unpad: the scaled side is "
        "int(h0 * cw / w0) (or int(w0 * ch / h0)); the rest of the grid's side, halved (//), is the band on each side.",
        "interleave.select_canvas and interleave.multipatch_layout; docs/MODEL.md §4 steps 1 and 5.",
    ],
    "ex07_packing": [
        "Two parts: decide the groups (a list of lists of samples), then turn each group into one Sample.",
        "sorted(samples, key=lambda s: -len(s.input_ids)) is stable; keep a list of the room left in each pack and "
        "take the first with room >= the sample's length. Per pack: torch.cat the fields, "
        "torch.cat([torch.arange(n) for n in lengths]), cumsum of [0] + lengths as int32.",
        "interleave.pack_samples.",
    ],
    "ex08_top_p": [
        "Sort each row's probabilities from the most likely; for each token, what do the tokens before it total?",
        "probs, order = softmax.sort(descending=True); before = probs.cumsum(-1) - probs; keep = before < top_p; "
        "keep[:, 0] = True; scatter keep back through order; masked_fill the rest with -inf.",
        "interleave.next_token, its top_p branch (it drops from the least likely end instead: the same set).",
    ],
    "ex09_kv_cache": [
        "Preallocate one zero tensor of keys and one of values per layer (or one for all layers with a layer axis); "
        "update writes, then reads.",
        "update: end = start + T; buffer[layer][:, :, start:end] = k (and v); return the slices [:, :, :end].",
        "interleave.KVCache.",
    ],
    "ex10_online_softmax": [
        "softmax(s) v = sum exp(s - m) v / sum exp(s - m) for ANY m; the running m only keeps exp from overflowing. "
        "What happens to terms computed with the old m when m grows?",
        "m_new = max(m, rowmax(s)); alpha = exp(m - m_new); p = exp(s - m_new); l = l * alpha + p.sum(-1); "
        "acc = acc * alpha + p @ v; where m_new is -inf, use 0 in its place in both exponents.",
        "kernels._fwd_kernel, its key-block loop (in exp2 units: scores times log2(e)).",
    ],
    "ex11_vision": [
        "patch_embed: a Conv2d with stride = kernel = p IS the per-patch linear map. vision_block: two residual "
        "branches, each starting from a norm.",
        "F.conv2d(pixels, weight, bias, stride=p) -> (N, C, g, g); .flatten(2).transpose(1, 2) + position. "
        "Block: x + self_attn(layer_norm1(x)); then x + fc2(gelu_tanh(fc1(layer_norm2(x)))).",
        "interleave.VisionTower.forward (as a matmul) and interleave.VisionBlock.forward.",
    ],
    "ex12_projector": [
        "The formulas are in the docstring; torch.erf and torch.tanh exist. Which of the two does the projector use?",
        "project = linear_2(gelu(linear_1(x), 'none')): the exact form, unlike the tower's.",
        "interleave.Projector.forward; docs/MODEL.md §1, the trap.",
    ],
    "ex13_attention": [
        "Three pieces: give each query head its key/value head, build a (Tq, Tk) boolean mask, then softmax over "
        "the visible keys.",
        "k.repeat_interleave(H // Hkv, dim=1); mask = ones(Tq, Tk).tril(Tk - Tq) when causal; with cu_seqlens, the "
        "sample index of each position (repeat_interleave over the lengths) must be equal for query and key.",
        "interleave.visibility and interleave.plain_attention.",
    ],
    "ex14_loss": [
        "Line the predictions up with what they predict: hidden[t] and labels[t + 1].",
        "targets = labels[1:]; keep = targets != IGNORE; logits = lm_head(hidden[:-1][keep]).float(); "
        "F.cross_entropy(logits, targets[keep], reduction='sum').",
        "train.py's WithLoss.forward.",
    ],
    "ex15_generate": [
        "Two phases: one call on the whole prompt (with a cache), then a loop with one call per new token.",
        "The prompt fills positions 0 .. T - 1; new token number i (from 0) sits at position T + i. Keep a boolean "
        "'finished' per row; torch.where(finished, the previous token, the argmax).",
        "LlavaInterleave.generate (with temperature 0, next_token is an argmax).",
    ],
    "ex16_template": [
        "Write the example prompt of docs/MODEL.md §3 out and cut it into pieces: which pieces does the loss see?",
        "A list starting with the system segment; three segments per turn; the images as markers in front; the "
        "generation prompt at the end when asked for (or by default after a user turn).",
        "interleave.chat_segments.",
    ],
    "ex17_newlines": [
        "Draw 2 x 2 tiles of 2 x 2 features on paper and number the features as they lie on the canvas.",
        "views[1:].view(rows, cols, s, s, H).permute(0, 2, 1, 3, 4).reshape(rows * s, cols * s, H); crop; "
        "cat a column of newline vectors on the right; flatten(0, 1); put views[0] in front.",
        "LlavaInterleave.merge_tiles.",
    ],
}
