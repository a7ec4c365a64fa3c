"""Known wrong answers, a few per exercise, each with what to tell whoever makes it (its docstring).

When a check fails, it runs these on the same inputs (exercises/check.py, Hint): if one of them gives exactly the
answer's output, the failure's hint says which mistake the answer behaves like; otherwise the general hint. So a sign
error in the rotary exercise is told about signs, not about pairing neighbours. soundness.py runs each of them as an
answer, and proves that its check fails it and names it.

Spoiler warning: each is one step away from a right answer.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

import interleave
from interleave import IGNORE
from interleave import Sample


def describe(mistake):
    """The first paragraph of a mistake's docstring, on one line."""
    first = mistake.__doc__.strip().split("\n\n")[0]
    return " ".join(first.split())


# ==== ex01: RMSNorm

def rms_weight_in_float32(x, weight, eps):
    """multiplies by the weight in float32 and casts at the end: right in float32, but in bfloat16 the checkpoints
    expect the cast back BEFORE the weight multiply."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def rms_eps_outside(x, weight, eps):
    """adds eps outside the square root, x / (sqrt(mean(x^2)) + eps): eps goes inside, x / sqrt(mean(x^2) + eps)."""
    x32 = x.float()
    y = x32 / (x32.pow(2).mean(dim=-1, keepdim=True).sqrt() + eps)
    return y.to(x.dtype) * weight


def rms_one_plus_weight(x, weight, eps):
    """scales by (1 + weight), Gemma's convention: Qwen2 uses the weight as stored."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return y.to(x.dtype) * (1 + weight)


def rms_minus_mean(x, weight, eps):
    """subtracts the mean first, as LayerNorm does: RMSNorm only divides by the root mean square."""
    x32 = x.float()
    x32 = x32 - x32.mean(dim=-1, keepdim=True)
    y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return y.to(x.dtype) * weight


# ==== ex02: rotary embedding

def rotary_neighbours(x, cos, sin):
    """pairs neighbours (2i, 2i + 1), the GPT-J / Meta LLaMA convention: Qwen2 pairs dimension i with i + D/2 (the
    two halves of the head)."""
    rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    return x * cos + rotated * sin


def rotary_backwards(x, cos, sin):
    """turns each pair the wrong way, (a cos + b sin, b cos - a sin): a sign error; the rotation is
    (a cos - b sin, b cos + a sin)."""
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([b, -a], dim=-1) * sin


def rotary_same_half(x, cos, sin):
    """multiplies sin by (-a, b), each half by itself: the sin term of a comes from its partner b, and of b from a:
    (-b, a)."""
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-a, b], dim=-1) * sin


# ==== ex03: video frames

def frames_to_total(total, num_frames):
    """spreads the frames up to total, one past the last frame: np.linspace ends at total - 1."""
    if total <= num_frames:
        return list(range(total))
    return np.linspace(0, total, num_frames, dtype=int).tolist()


def frames_rounded(total, num_frames):
    """rounds the positions to the nearest frame: truncate them (np.linspace(..., dtype=int))."""
    if total <= num_frames:
        return list(range(total))
    return [int(round(i)) for i in np.linspace(0, total - 1, num_frames)]


def frames_stride(total, num_frames):
    """takes every (total // num_frames)-th frame from the first: spread them from the first to the LAST frame."""
    if total <= num_frames:
        return list(range(total))
    return list(range(0, total, total // num_frames))[:num_frames]


def frames_no_endpoint(total, num_frames):
    """never reaches the last frame (np.linspace(..., endpoint=False)): the last index is total - 1."""
    if total <= num_frames:
        return list(range(total))
    return np.linspace(0, total - 1, num_frames, endpoint=False, dtype=int).tolist()


# ==== ex04: splice

def splice_per_row(text_embeds, input_ids, image_token_id, features):
    """starts every batch row again at features[0]: the k-th slot, counting row by row through the whole batch,
    takes features[k]."""
    out = text_embeds.clone()
    for row in range(len(input_ids)):
        where = (input_ids[row] == image_token_id).nonzero()[:, 0]
        out[row, where] = features[:len(where)].to(out.dtype)
    return out


def splice_column_major(text_embeds, input_ids, image_token_id, features):
    """fills the slots column by column (position 0 of every row first): the order is row by row, each row from
    left to right."""
    out = text_embeds.clone().transpose(0, 1)
    slots = (input_ids == image_token_id).T
    out[slots] = features.to(out.dtype)
    return out.transpose(0, 1)


# ==== ex05: labels

def label_parts(segments, tokenizer, image_token_id, slots_per_image):
    """What every ex05 mistake starts from: the ids; per token whether it lies in an assistant turn and in a reply
    segment; and the ids of <|im_start|>, <|im_end|> and the lone newline."""
    ids, assistant_turn, reply = [], [], []
    assistant = False
    for text, is_reply in segments:
        if text.startswith("<|im_start|>"):
            assistant = text.startswith("<|im_start|>assistant\n")
        piece = interleave.encode_prompt(tokenizer, text, image_token_id, slots_per_image)
        ids += piece
        assistant_turn += [assistant] * len(piece)
        reply += [is_reply] * len(piece)
    everywhere = {tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")}
    everywhere.update(tokenizer.encode("\n").ids)
    return ids, assistant_turn, reply, everywhere


def labels_on_slots(segments, tokenizer, image_token_id, slots_per_image):
    """labels the image slots inside a reply: a slot always gets IGNORE (the model cannot predict pixels)."""
    ids, assistant_turn, _, everywhere = label_parts(segments, tokenizer, image_token_id, slots_per_image)
    return ids, [t if a or t in everywhere else IGNORE for t, a in zip(ids, assistant_turn)]


def labels_shifted(segments, tokenizer, image_token_id, slots_per_image):
    """shifts the labels by one: here the label of position t is the token AT t; the loss shifts them itself."""
    ids, assistant_turn, _, everywhere = label_parts(segments, tokenizer, image_token_id, slots_per_image)
    labels = [t if (a or t in everywhere) and t != image_token_id else IGNORE for t, a in zip(ids, assistant_turn)]
    return ids, labels[1:] + [IGNORE]


def labels_everywhere(segments, tokenizer, image_token_id, slots_per_image):
    """labels the system and user turns whole too: there only <|im_start|>, <|im_end|> and lone newlines are."""
    ids, _, _, _ = label_parts(segments, tokenizer, image_token_id, slots_per_image)
    return ids, [t if t != image_token_id else IGNORE for t in ids]


def labels_replies_only(segments, tokenizer, image_token_id, slots_per_image):
    """labels the replies only, the rule of train.py --loss-on replies: the release labels each assistant turn whole,
    then every <|im_start|>, <|im_end|> and lone newline wherever it stands."""
    ids, _, reply, _ = label_parts(segments, tokenizer, image_token_id, slots_per_image)
    return ids, [t if r and t != image_token_id else IGNORE for t, r in zip(ids, reply)]


def labels_assistant_turns_only(segments, tokenizer, image_token_id, slots_per_image):
    """labels the assistant turns only: the release then also labels every <|im_start|>, <|im_end|> and lone newline
    of the system and user turns."""
    ids, assistant_turn, _, _ = label_parts(segments, tokenizer, image_token_id, slots_per_image)
    return ids, [t if a and t != image_token_id else IGNORE for t, a in zip(ids, assistant_turn)]


def labels_without_header(segments, tokenizer, image_token_id, slots_per_image):
    """leaves the role name of the assistant's header unlabelled: the release labels the whole assistant turn,
    "assistant" after <|im_start|> included."""
    ids, _, reply, everywhere = label_parts(segments, tokenizer, image_token_id, slots_per_image)
    return ids, [t if (r or t in everywhere) and t != image_token_id else IGNORE for t, r in zip(ids, reply)]


def labels_any_newline(segments, tokenizer, image_token_id, slots_per_image):
    """labels every token that holds a newline ("\\n\\n", ".\\n") in the user turns too: only the lone newline is,
    the one id that tokenizer.encode("\\n") gives."""
    ids, assistant_turn, _, everywhere = label_parts(segments, tokenizer, image_token_id, slots_per_image)
    labels = []
    for t, a in zip(ids, assistant_turn):
        newline = "\u010a" in (tokenizer.id_to_token(t) or "")   # byte-level BPE writes a newline as "\u010a"
        labels.append(t if (a or t in everywhere or newline) and t != image_token_id else IGNORE)
    return ids, labels


# ==== ex06: multi-patch canvas and unpadding

def canvas_last_of_equals(image_size, pinpoints):
    """compares with >= / <=, so the LAST of equal canvases wins: strict comparisons, the first best one wins."""
    w0, h0 = image_size
    best, best_effective, best_waste = None, 0, float("inf")
    for w, h in pinpoints:
        scale = min(w / w0, h / h0)
        effective = min(int(w0 * scale) * int(h0 * scale), w0 * h0)
        waste = w * h - effective
        if effective > best_effective or (effective == best_effective and waste <= best_waste):
            best, best_effective, best_waste = (w, h), effective, waste
    return best


def canvas_scale_max(image_size, pinpoints):
    """scales by the larger ratio, max(W / w0, H / h0), so the image would overflow the canvas: the image is fitted
    INSIDE it, scale = min(W / w0, H / h0)."""
    w0, h0 = image_size
    best, best_effective, best_waste = None, 0, float("inf")
    for w, h in pinpoints:
        scale = max(w / w0, h / h0)
        effective = min(int(w0 * scale) * int(h0 * scale), w0 * h0)
        waste = w * h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (w, h), effective, waste
    return best


def canvas_uncapped(image_size, pinpoints):
    """counts the upscaled resolution as gained (no min with w0 * h0), so small images get the biggest canvas:
    effective = min(int(w0 * scale) * int(h0 * scale), w0 * h0), as upscaling adds no detail."""
    w0, h0 = image_size
    best, best_effective, best_waste = None, 0, float("inf")
    for w, h in pinpoints:
        scale = min(w / w0, h / h0)
        effective = int(w0 * scale) * int(h0 * scale)
        waste = w * h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (w, h), effective, waste
    return best


def unpad_rounded(image_size, rows, cols, s):
    """rounds new instead of truncating it: new = int(h0 * (cw / w0)), the float truncated as the release does."""
    w0, h0 = image_size
    ch, cw = rows * s, cols * s
    if w0 / h0 > cw / ch:
        p = (ch - round(h0 * (cw / w0))) // 2
        return p, ch - p, 0, cw
    p = (cw - round(w0 * (ch / h0))) // 2
    return 0, ch, p, cw - p


def unpad_sides_swapped(image_size, rows, cols, s):
    """puts the bands on the wrong sides: an image wider than the grid (w0 / h0 > cw / ch) has them above and below."""
    w0, h0 = image_size
    ch, cw = rows * s, cols * s
    if w0 / h0 <= cw / ch:
        p = (ch - int(h0 * (cw / w0))) // 2
        return p, ch - p, 0, cw
    p = (cw - int(w0 * (ch / h0))) // 2
    return 0, ch, p, cw - p


def unpad_one_side(image_size, rows, cols, s):
    """puts all of the padding at the end: it is split in two, p = (ch - new) // 2 on each side."""
    w0, h0 = image_size
    ch, cw = rows * s, cols * s
    if w0 / h0 > cw / ch:
        return 0, int(h0 * (cw / w0)), 0, cw
    return 0, ch, 0, int(w0 * (ch / h0))


# ==== ex07: packing

def packed(group):
    """One pack of the samples in group, in that order (right): a helper of the packing mistakes."""
    lengths = [len(s.input_ids) for s in group]
    pixels = [s.pixel_values for s in group if s.pixel_values is not None]
    return Sample(torch.cat([s.input_ids for s in group]), torch.cat([s.labels for s in group]),
                  torch.cat(pixels) if pixels else None, [size for s in group for size in s.image_sizes],
                  position_ids=torch.cat([torch.arange(n) for n in lengths]),
                  cu_seqlens=torch.tensor([0] + lengths).cumsum(0).to(torch.int32))


def first_fit(samples, budget):
    """The groups of first fit, in the order samples are given (a helper)."""
    groups, room = [], []
    for sample in samples:
        n = len(sample.input_ids)
        if n > budget:
            raise ValueError("too long")
        j = next((j for j, free in enumerate(room) if free >= n), None)
        if j is None:
            groups.append([])
            room.append(budget)
            j = len(groups) - 1
        groups[j].append(sample)
        room[j] -= n
    return groups


def pack_given_order(samples, budget):
    """goes through the samples in the given order: first fit goes from the longest to the shortest."""
    return [packed(group) for group in first_fit(samples, budget)]


def pack_shortest_first(samples, budget):
    """goes from the shortest to the longest: longest first (equal lengths in their given order)."""
    order = sorted(samples, key=lambda s: len(s.input_ids))
    return [packed(group) for group in first_fit(order, budget)]


def pack_next_fit(samples, budget):
    """only tries the newest pack: try every pack from the first one (first fit)."""
    groups, room = [], []
    for sample in sorted(samples, key=lambda s: -len(s.input_ids)):
        n = len(sample.input_ids)
        if n > budget:
            raise ValueError("too long")
        if not room or room[-1] < n:
            groups.append([])
            room.append(budget)
        groups[-1].append(sample)
        room[-1] -= n
    return [packed(group) for group in groups]


def pack_positions_count_on(samples, budget):
    """counts the positions on over the whole pack: they restart at 0 at each sample, whose rotary angles must not
    depend on what is packed before it."""
    packs = []
    for group in first_fit(sorted(samples, key=lambda s: -len(s.input_ids)), budget):
        one = packed(group)
        one.position_ids = torch.arange(len(one.input_ids))
        packs.append(one)
    return packs


# ==== ex08: top-p

def top_p_drops_crossing(logits, top_p):
    """drops the token whose cumulative probability crosses top_p: keep a token iff the MORE likely tokens total
    less than top_p, so the one that crosses it stays."""
    probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
    drop_sorted = probs.cumsum(-1) > top_p
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def top_p_loses_top(logits, top_p):
    """can drop the most likely token (top_p = 0 keeps nothing): the most likely token always stays."""
    probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
    keep_sorted = probs.cumsum(-1) - probs < top_p
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def top_p_unsorted(logits, top_p):
    """sums the probabilities in vocabulary order: sort them from the most likely first."""
    probs = logits.softmax(-1)
    keep = probs.cumsum(-1) - probs < top_p
    keep[torch.arange(len(logits)), probs.argmax(-1)] = True
    return logits.masked_fill(~keep, float("-inf"))


# ==== ex09: KV cache

class CacheNewOnly:
    """update returns only the new keys and values, so a decoding step attends to itself alone: return every
    position so far, 0 .. start + T - 1."""

    def __init__(self, layers, batch, kv_heads, max_len, head_dim, dtype, device):
        self.k = torch.zeros(layers, batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, layer, start, k, v):
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return k, v


class CacheWholeBuffer:
    """returns the whole preallocated buffer, max_len positions: only positions 0 .. start + T - 1 hold keys yet."""

    def __init__(self, layers, batch, kv_heads, max_len, head_dim, dtype, device):
        self.k = torch.zeros(layers, batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, layer, start, k, v):
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer], self.v[layer]


class CacheOneForAllLayers:
    """keeps one buffer for all layers, so each layer overwrites the others' keys: a buffer per layer."""

    def __init__(self, layers, batch, kv_heads, max_len, head_dim, dtype, device):
        self.k = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, layer, start, k, v):
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


# ==== ex10: online softmax

def softmax_acc_not_rescaled(m, l, acc, s, v):
    """rescales l but not acc: when the maximum grows, BOTH are scaled by exp(m_old - m_new)."""
    m_new = torch.maximum(m, s.max(dim=-1).values)
    m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    p = torch.exp(s - m_safe[:, None])
    return m_new, l * torch.exp(m - m_safe) + p.sum(-1), acc + p @ v


def softmax_nan_rows(m, l, acc, s, v):
    """subtracts an infinite maximum for a row that has seen no key yet (exp(-inf - -inf) is NaN): subtract 0
    there instead."""
    m_new = torch.maximum(m, s.max(dim=-1).values)
    p = torch.exp(s - m_new[:, None])
    alpha = torch.exp(m - m_new)
    return m_new, l * alpha + p.sum(-1), acc * alpha[:, None] + p @ v


def softmax_inverted(m, l, acc, s, v):
    """scales the old state by exp(m_new - m_old), which grows it: the old terms shrink, by exp(m_old - m_new)."""
    m_new = torch.maximum(m, s.max(dim=-1).values)
    m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    p = torch.exp(s - m_safe[:, None])
    alpha = torch.exp(m_safe - torch.where(torch.isinf(m), m_safe, m))
    return m_new, l * alpha + p.sum(-1), acc * alpha[:, None] + p @ v


def softmax_never_rescaled(m, l, acc, s, v):
    """never rescales the old l and acc: when a block raises the maximum, scale them by exp(m_old - m_new)."""
    m_new = torch.maximum(m, s.max(dim=-1).values)
    m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    p = torch.exp(s - m_safe[:, None])
    return m_new, l + p.sum(-1), acc + p @ v


# ==== ex11: patch embedding and vision block

def patches_column_major(pixels, weight, bias, position):
    """orders the patches column by column: row by row, the top row of patches from left to right first."""
    x = F.conv2d(pixels, weight, bias, stride=weight.shape[-1])   # (N, C, g, g)
    return x.transpose(2, 3).flatten(2).transpose(1, 2) + position


def patches_no_position(pixels, weight, bias, position):
    """leaves out the position embedding: each patch vector gets position[i] added."""
    x = F.conv2d(pixels, weight, bias, stride=weight.shape[-1])
    return x.flatten(2).transpose(1, 2)


def patches_channels_last(pixels, weight, bias, position):
    """flattens each patch as (y, x, RGB) against a weight flattened as (RGB, y, x): flatten both the same way."""
    p = weight.shape[-1]
    g = pixels.shape[-1] // p
    x = pixels[:, :, :g * p, :g * p].unflatten(2, (g, p)).unflatten(4, (g, p))   # (N, 3, g, p, g, p)
    x = x.permute(0, 2, 4, 3, 5, 1).flatten(3).flatten(1, 2)                     # (N, g*g, p*p*3)
    return F.linear(x, weight.flatten(1), bias) + position


def block_exact_gelu(block, x):
    """uses the exact GELU: the tower uses GELU's tanh approximation (the projector is the one with the exact)."""
    x = x + block.self_attn(block.layer_norm1(x))
    return x + block.fc2(F.gelu(block.fc1(block.layer_norm2(x))))


def block_post_norm(block, x):
    """normalises after adding (post-norm, x = norm(x + f(x))): SigLIP blocks are pre-norm, x = x + f(norm(x))."""
    x = block.layer_norm1(x + block.self_attn(x))
    return block.layer_norm2(x + block.fc2(F.gelu(block.fc1(x), approximate="tanh")))


def block_one_norm(block, x):
    """uses layer_norm1 before the MLP too: the MLP has its own, layer_norm2."""
    x = x + block.self_attn(block.layer_norm1(x))
    return x + block.fc2(F.gelu(block.fc1(block.layer_norm1(x)), approximate="tanh"))


# ==== ex12: GELU and projector

def gelu_always_exact(x, approximate):
    """ignores approximate: "tanh" asks for the tanh formula, 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def gelu_always_tanh(x, approximate):
    """ignores approximate: "none" asks for the exact formula, 0.5 x (1 + erf(x / sqrt(2)))."""
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def gelu_no_cube(x, approximate):
    """leaves out the 0.044715 x^3 term of the tanh form."""
    if approximate == "tanh":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * x))
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def gelu_no_half(x, approximate):
    """leaves out the factor 0.5: GELU(x) = x * P(X <= x) = 0.5 x (1 + erf(x / sqrt(2)))."""
    if approximate == "tanh":
        return x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return x * (1 + torch.erf(x / math.sqrt(2)))


def project_tanh(projector, x):
    """uses the tanh GELU of the vision tower: the projector's is the exact (erf) one (docs/MODEL.md §1, the trap)."""
    return projector.linear_2(F.gelu(projector.linear_1(x), approximate="tanh"))


def project_relu(projector, x):
    """uses ReLU: the projector ("mlp2x_gelu") uses the exact GELU."""
    return projector.linear_2(F.relu(projector.linear_1(x)))


def project_gelu_twice(projector, x):
    """applies GELU after linear_2 too: only between the two linear layers."""
    return F.gelu(projector.linear_2(F.gelu(projector.linear_1(x))))


# ==== ex13: attention

def attention_with(q, k, v, visible, heads_of, scale):
    """Attention under a given (Tq, Tk) mask, query-to-kv head map and scale (a helper)."""
    k = k[:, heads_of]
    v = v[:, heads_of]
    scores = q.float() @ k.float().transpose(-1, -2) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def mask(tq, tk, causal, cu_seqlens, top_left=False):
    """The (Tq, Tk) visibility, right unless top_left (a helper)."""
    visible = torch.ones(tq, tk, dtype=torch.bool)
    if causal:
        visible = visible.tril(0 if top_left else tk - tq)
    if cu_seqlens is not None:
        sample = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), cu_seqlens.diff())   # (T,)
        visible = visible & (sample[:, None] == sample[None, :])
    return visible


def grouped(h, hkv):
    """The right head map, h // (H / Hkv) (a helper)."""
    return torch.arange(h) // (h // hkv)


def attend_top_left(q, k, v, causal, cu_seqlens=None):
    """aligns the causal mask top-left (query i sees keys 0 .. i): the queries are the LAST Tq of the Tk positions,
    so query i sees keys 0 .. i + Tk - Tq (bottom-right)."""
    visible = mask(q.shape[2], k.shape[2], causal, cu_seqlens, top_left=True)
    return attention_with(q, k, v, visible, grouped(q.shape[1], k.shape[1]), q.shape[-1] ** -0.5)


def attend_heads_modulo(q, k, v, causal, cu_seqlens=None):
    """maps query head h to key/value head h % Hkv (k.repeat): consecutive query heads share one, h // (H / Hkv)
    (k.repeat_interleave)."""
    heads_of = torch.arange(q.shape[1]) % k.shape[1]
    visible = mask(q.shape[2], k.shape[2], causal, cu_seqlens)
    return attention_with(q, k, v, visible, heads_of, q.shape[-1] ** -0.5)


def attend_across_samples(q, k, v, causal, cu_seqlens=None):
    """ignores cu_seqlens: a packed sample must not see the keys of the samples before it."""
    visible = mask(q.shape[2], k.shape[2], causal, None)
    return attention_with(q, k, v, visible, grouped(q.shape[1], k.shape[1]), q.shape[-1] ** -0.5)


def attend_unscaled(q, k, v, causal, cu_seqlens=None):
    """forgets to scale the scores by 1 / sqrt(D)."""
    visible = mask(q.shape[2], k.shape[2], causal, cu_seqlens)
    return attention_with(q, k, v, visible, grouped(q.shape[1], k.shape[1]), 1.0)


# ==== ex14: the loss

def loss_unshifted(hidden, labels, lm_head):
    """scores position t against the token AT t: position t predicts the token at t + 1 (hidden[:-1] against
    labels[1:])."""
    keep = labels != IGNORE
    return F.cross_entropy(lm_head(hidden[keep]).float(), labels[keep], reduction="sum")


def loss_shifted_backwards(hidden, labels, lm_head):
    """scores position t + 1 against the token at t, a shift the wrong way: hidden[:-1] against labels[1:]."""
    keep = labels[:-1] != IGNORE
    return F.cross_entropy(lm_head(hidden[1:][keep]).float(), labels[:-1][keep], reduction="sum")


def loss_mean(hidden, labels, lm_head):
    """returns the mean over the labelled positions: return the sum; the caller divides by the labelled tokens of
    the whole step (several packs)."""
    keep = labels[1:] != IGNORE
    return F.cross_entropy(lm_head(hidden[:-1][keep]).float(), labels[1:][keep])


# ==== ex15: greedy generation

def greedy_with(model, input_ids, pixel_values, max_new_tokens, stop_ids, offset=0, repeat=True, all_stop=True):
    """Greedy decoding with a KV cache, right unless told otherwise (a helper): offset shifts the new tokens'
    positions, repeat=False lets a stopped row go on, all_stop=False ends at the first stop."""
    b, t = input_ids.shape
    c, weight = model.config.text, model.lm_head.weight
    cache = interleave.KVCache(c.layers, b, c.kv_heads, t + max_new_tokens + offset, c.head_dim, weight.dtype,
                               weight.device)
    with torch.no_grad():
        logits = model(input_ids, pixel_values, cache=cache)[:, -1]
        finished = torch.zeros(b, dtype=torch.bool)
        new = []
        for step in range(max_new_tokens):
            token = logits.argmax(-1)
            if new and repeat:
                token = torch.where(finished, new[-1], token)
            new.append(token)
            finished |= torch.isin(token, torch.tensor(stop_ids, dtype=torch.long))
            if (finished.all() if all_stop else finished.any()) or step == max_new_tokens - 1:
                break
            logits = model(token[:, None], cache=cache, start=t + step + offset)[:, -1]
    return torch.stack(new, dim=1)


def greedy_position_plus_one(model, input_ids, pixel_values, max_new_tokens, stop_ids):
    """runs each new token at start = its position + 1: the first new token sits at position T (the prompt holds
    0 .. T - 1), the next at T + 1, ..."""
    return greedy_with(model, input_ids, pixel_values, max_new_tokens, stop_ids, offset=1)


def greedy_no_repeat(model, input_ids, pixel_values, max_new_tokens, stop_ids):
    """lets a stopped row go on generating: a row that has emitted a stop id repeats it until every row has."""
    return greedy_with(model, input_ids, pixel_values, max_new_tokens, stop_ids, repeat=False)


def greedy_first_stop_ends_all(model, input_ids, pixel_values, max_new_tokens, stop_ids):
    """ends every row when the first one stops: go on until EVERY row has emitted a stop id."""
    return greedy_with(model, input_ids, pixel_values, max_new_tokens, stop_ids, all_stop=False)


# ==== ex16: chat template

def template_with(turns, system, add_generation_prompt, images_after=False, system_turn=True, header_is_reply=False,
                  newline_in_reply=False, image_newline="\n"):
    """The template, right unless told otherwise (a helper)."""
    segments = [(f"<|im_start|>system\n{system}<|im_end|>\n", False)] if system_turn else []
    for role, text, *rest in turns:
        if rest:
            images, markers = rest[0], text.count("<image>")
            if images and not markers and images_after:
                text = text + "\n" + "<image>" * len(images)
            elif images and not markers:
                text = "<image>" * len(images) + image_newline + text
            elif markers != len(images):
                raise ValueError("markers")
        reply = role == "assistant"
        if newline_in_reply:
            segments += [(f"<|im_start|>{role}\n", header_is_reply and reply), (text + "<|im_end|>\n", reply)]
            continue
        segments += [(f"<|im_start|>{role}\n", header_is_reply and reply), (text + "<|im_end|>", reply), ("\n", False)]
    if add_generation_prompt or (add_generation_prompt is None and turns[-1][0] == "user"):
        segments.append(("<|im_start|>assistant\n", False))
    return segments


def template_images_after(turns, system="You are a helpful assistant.", add_generation_prompt=None):
    """puts the images after the text: without markers they go in front of it, "<image><image>\\n" + text."""
    return template_with(turns, system, add_generation_prompt, images_after=True)


def template_no_system(turns, system="You are a helpful assistant.", add_generation_prompt=None):
    """leaves out the system turn: every prompt starts with "<|im_start|>system\\n" + system + "<|im_end|>\\n"."""
    return template_with(turns, system, add_generation_prompt, system_turn=False)


def template_header_is_reply(turns, system="You are a helpful assistant.", add_generation_prompt=None):
    """marks the assistant's header "<|im_start|>assistant\\n" as reply: only the reply text and its <|im_end|> are."""
    return template_with(turns, system, add_generation_prompt, header_is_reply=True)


def template_newline_in_reply(turns, system="You are a helpful assistant.", add_generation_prompt=None):
    """puts the "\\n" after <|im_end|> into the turn's segment: it is a segment of its own, never a reply."""
    return template_with(turns, system, add_generation_prompt, newline_in_reply=True)


def template_no_image_newline(turns, system="You are a helpful assistant.", add_generation_prompt=None):
    """puts no newline between the images and the text: "<image><image>\\n" + text."""
    return template_with(turns, system, add_generation_prompt, image_newline="")


# ==== ex17: merge_tiles

def merged(views, image_size, config, newline, order="grid", newline_first=False, base_last=False, unpad=True):
    """A multi-patch image's vectors, right unless told otherwise (a helper)."""
    _, rows, cols, (top, bottom, left, right) = interleave.multipatch_layout(image_size, config)
    s = config.vision.image_size // config.vision.patch_size
    h = views.shape[-1]
    tiles = views[1:].view(rows, cols, s, s, h)
    if order == "tile after tile":
        grid = views[1:].reshape(rows * s, cols * s, h)
    elif order == "column by column":
        grid = tiles.permute(1, 3, 0, 2, 4).reshape(cols * s, rows * s, h).transpose(0, 1)
    else:
        grid = tiles.permute(0, 2, 1, 3, 4).reshape(rows * s, cols * s, h)
    if unpad:
        grid = grid[top:bottom, left:right]
    ends = newline.to(grid.dtype).expand(grid.shape[0], 1, h)
    rows_out = torch.cat([ends, grid] if newline_first else [grid, ends], dim=1).flatten(0, 1)
    return torch.cat([rows_out, views[0]] if base_last else [views[0], rows_out])


def merge_tile_after_tile(views, image_size, config, newline):
    """lays the tiles out tile after tile (each flattened whole): the grid's feature rows run ACROSS the tiles of a
    tile row, as the pixels lie on the canvas (view (rows, cols, s, s, H), then permute)."""
    return merged(views, image_size, config, newline, order="tile after tile")


def merge_newline_first(views, image_size, config, newline):
    """puts image_newline at the START of every row: it closes each row, at its end."""
    return merged(views, image_size, config, newline, newline_first=True)


def merge_base_last(views, image_size, config, newline):
    """puts the base view after the tiles: its s * s vectors go first."""
    return merged(views, image_size, config, newline, base_last=True)


def merge_not_unpadded(views, image_size, config, newline):
    """keeps the whole grid: keep only rows top .. bottom - 1 and columns left .. right - 1 (the black border goes)."""
    return merged(views, image_size, config, newline, unpad=False)


def merge_column_by_column(views, image_size, config, newline):
    """flattens the grid column by column: row by row, each row closed by image_newline."""
    _, rows, cols, (top, bottom, left, right) = interleave.multipatch_layout(image_size, config)
    s = config.vision.image_size // config.vision.patch_size
    h = views.shape[-1]
    grid = views[1:].view(rows, cols, s, s, h).permute(0, 2, 1, 3, 4).reshape(rows * s, cols * s, h)
    grid = grid[top:bottom, left:right].transpose(0, 1)   # (X, Y, H)
    ends = newline.to(grid.dtype).expand(grid.shape[0], 1, h)
    return torch.cat([views[0], torch.cat([grid, ends], dim=1).flatten(0, 1)])


# ==== which mistakes each check compares a failing answer with: "exercise module.the function (or class) asked for"

MISTAKES = {
    "ex01_rmsnorm.rms_norm": [rms_weight_in_float32, rms_eps_outside, rms_one_plus_weight, rms_minus_mean],
    "ex02_rotary.apply_rotary": [rotary_neighbours, rotary_backwards, rotary_same_half],
    "ex03_frames.sample_frame_indices": [frames_to_total, frames_rounded, frames_stride, frames_no_endpoint],
    "ex04_splice.splice_images": [splice_per_row, splice_column_major],
    "ex05_labels.ids_and_labels": [labels_on_slots, labels_shifted, labels_everywhere, labels_replies_only,
                                   labels_assistant_turns_only, labels_without_header, labels_any_newline],
    "ex06_anyres.select_canvas": [canvas_last_of_equals, canvas_scale_max, canvas_uncapped],
    "ex06_anyres.unpad": [unpad_rounded, unpad_sides_swapped, unpad_one_side],
    "ex07_packing.pack": [pack_given_order, pack_shortest_first, pack_next_fit, pack_positions_count_on],
    "ex08_top_p.top_p_filter": [top_p_drops_crossing, top_p_loses_top, top_p_unsorted],
    "ex09_kv_cache.KVCache": [CacheNewOnly, CacheWholeBuffer, CacheOneForAllLayers],
    "ex10_online_softmax.online_softmax_step": [softmax_acc_not_rescaled, softmax_nan_rows, softmax_inverted,
                                                softmax_never_rescaled],
    "ex11_vision.patch_embed": [patches_column_major, patches_no_position, patches_channels_last],
    "ex11_vision.vision_block": [block_exact_gelu, block_post_norm, block_one_norm],
    "ex12_projector.gelu": [gelu_always_exact, gelu_always_tanh, gelu_no_cube, gelu_no_half],
    "ex12_projector.project": [project_tanh, project_relu, project_gelu_twice],
    "ex13_attention.attend": [attend_top_left, attend_heads_modulo, attend_across_samples, attend_unscaled],
    "ex14_loss.reply_loss": [loss_unshifted, loss_shifted_backwards, loss_mean],
    "ex15_generate.greedy": [greedy_position_plus_one, greedy_no_repeat, greedy_first_stop_ends_all],
    "ex16_template.chat_segments": [template_images_after, template_no_system, template_header_is_reply,
                                    template_newline_in_reply, template_no_image_newline],
    "ex17_newlines.merge_tiles": [merge_tile_after_tile, merge_newline_first, merge_base_last, merge_not_unpadded,
                                  merge_column_by_column],
}
