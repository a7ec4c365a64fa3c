# %% [markdown]
# # One question, tensor by tensor
#
# This walkthrough follows one example of the demo (`python sample.py`) through the model, the way
# `interleave.py` computes it: pixels -> patches -> vision features -> projected vectors -> image
# slots in the token stream -> decoder -> logits -> the next token. It uses the embedded tiny model
# (`models/m4-tiny`), so it runs in seconds on a laptop CPU and needs no download.
#
# Open it in VS Code or Jupyter (the `# %%` lines are cells), or run it as a script:
# `python docs/walkthrough.py`. Each step recomputes a piece by hand and checks it against the
# model's own function, so the cells also show *where* in `interleave.py` each step lives.
# The facts behind each step are in `docs/MODEL.md` (§1 architecture, §3 image slots).

# %%
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import interleave  # noqa: E402
from data import make_m4  # noqa: E402

torch.manual_seed(0)
MODEL = os.path.join(ROOT, "models", "m4-tiny")
model = interleave.load(MODEL, dtype=torch.float32).eval()
tokenizer = interleave.load_tokenizer(MODEL)
config = model.config
print(f"vision tower: {config.vision.layers} layers of width {config.vision.hidden}, "
      f"{config.vision.image_size}-pixel images in {config.vision.patch_size}-pixel patches")
print(f"decoder: {config.text.layers} layers of width {config.text.hidden}, "
      f"vocabulary {config.text.vocab}")

# %% [markdown]
# ## 1. The question
#
# The multi-image task of the synthetic data (`data/make_m4.py`): three pictures, one of which
# differs. This is the demo's first question, drawn from the held-out split.

# %%
images, question, expected = make_m4.make_example("multi_image", seed=0, split="val", index=0)[:3]
print(question)
print("expected answer:", expected)
print("images:", [image.size for image in images])

# %% [markdown]
# ## 2. Pixels
#
# Every image is resized to the tower's size, scaled to [0, 1] and normalised with mean 0.5 and
# std 0.5, so the pixels lie in [-1, 1] (§4). `interleave.preprocess` does it; `image_to_pixels`
# is the one line that matters.

# %%
pixels = torch.cat([interleave.preprocess(image, config) for image in images])
print("pixels:", tuple(pixels.shape), f"in [{pixels.min():.2f}, {pixels.max():.2f}]")   # (3, 3, S, S)
assert pixels.shape == (3, 3, config.vision.image_size, config.vision.image_size)

# %% [markdown]
# ## 3. Patches
#
# The tower cuts each image into a grid of square patches and flattens each patch in (RGB, y, x)
# order. A 64-pixel image in 16-pixel patches gives a 4 x 4 grid: 16 patches of 3 * 16 * 16 = 768
# numbers. (The release: 384 pixels, 14-pixel patches, 27 x 27 = 729 patches.)

# %%
p = config.vision.patch_size
g = config.vision.image_size // p
patches = pixels.unfold(2, p, p).unfold(3, p, p)          # (N, 3, g, g, p, p)
patches = patches.permute(0, 2, 3, 1, 4, 5)               # (N, g, g, 3, p, p)
patches = patches.reshape(len(pixels), g * g, 3 * p * p)  # (N, g*g, 3*p*p)
print("patches:", tuple(patches.shape))
# Patch 1 of image 0 is the top-left square, second from the left.
assert torch.equal(patches[0, 1], pixels[0, :, :p, p:2 * p].flatten())

# %% [markdown]
# ## 4. Vision features
#
# The patch embedding is a linear map of each patch (stored as a convolution), plus a learned
# position vector per patch. Then the transformer blocks (`VisionBlock`). The features are the
# LAST block's output, without `post_layernorm` (§1: applying it is the classic bug).

# %%
tower = model.vision
weight = tower.patch_embedding.weight.flatten(1)          # (C, 3*p*p)
x = F.linear(patches, weight, tower.patch_embedding.bias)  # (N, g*g, C)
x = x + tower.position_embedding.weight                    # (N, g*g, C)
with torch.no_grad():
    for block in tower.layers:
        x = block(x)
    features = tower(pixels)                               # (N, g*g, C)
print("vision features:", tuple(features.shape))
assert torch.allclose(x, features, atol=1e-5)

# %% [markdown]
# ## 5. Projected vectors
#
# The projector (Linear -> exact GELU -> Linear) maps every feature to the decoder's width. Each
# projected vector will fill exactly one image slot of the token stream.

# %%
with torch.no_grad():
    projected = model.projector(features)                  # (N, g*g, H)
    spliced = model.encode_images(pixels)                  # (N * g*g, H)
print("projected:", tuple(projected.shape), "-> slot vectors:", tuple(spliced.shape))
assert torch.equal(projected.flatten(0, 1), spliced)

# %% [markdown]
# ## 6. Image slots in the token stream
#
# The chat template (§3) is tokenized piece by piece around each `<image>` marker, and every image
# becomes `g * g` consecutive slots holding `config.image_token_id`. Without markers in the
# question, the images go in front of it.

# %%
sample = interleave.build_inputs([("user", question, images)], tokenizer, config)
ids = sample.input_ids                                     # (T,)
slots = (ids == config.image_token_id).nonzero().flatten()
print(f"{len(ids)} tokens, {len(slots)} of them image slots, at positions "
      f"{slots[0].item()}..{slots[-1].item()}")
text = tokenizer.decode(ids[ids != config.image_token_id].tolist(), skip_special_tokens=False)
print(text)
assert len(slots) == len(images) * g * g

# %% [markdown]
# ## 7. Splicing
#
# `LlavaInterleave.embed` looks up the text tokens and writes the projected vectors into the
# slots, in order: this one `masked_scatter` is the paper's "interleaving".

# %%
with torch.no_grad():
    embedded = model.embed(ids[None], sample.pixel_values)  # (1, T, H)
print("embedded:", tuple(embedded.shape))
assert torch.equal(embedded[0, slots], spliced)
first_text = 0
assert torch.equal(embedded[0, first_text], model.decoder.embed_tokens.weight[ids[first_text]])

# %% [markdown]
# ## 8. Decoder and logits
#
# The Qwen2 decoder runs over the whole stream (causal attention: every position sees those
# before it, image slots included), and the head turns the last position into one score per
# vocabulary entry.

# %%
with torch.no_grad():
    positions = torch.arange(len(ids))[None]               # (1, T)
    hidden = model.decoder(embedded, positions)            # (1, T, H)
    logits = model.lm_head(hidden)                         # (1, T, vocab)
    reference = model(ids[None], sample.pixel_values)      # (1, T, vocab)
print("logits:", tuple(logits.shape))
assert torch.allclose(logits, reference, atol=1e-5)

# %% [markdown]
# ## 9. The next token
#
# Greedy decoding takes the highest score. The top five show how sure the model is.

# %%
probabilities = logits[0, -1].softmax(-1)
top = probabilities.topk(5)
for probability, token in zip(top.values.tolist(), top.indices.tolist()):
    print(f"{tokenizer.decode([token])!r:12} {probability:.3f}")
next_id = int(logits[0, -1].argmax())
print("next token:", repr(tokenizer.decode([next_id])))

# %% [markdown]
# ## 10. The whole answer
#
# `generate` repeats step 9 token by token, with a KV cache so that each new token runs the
# decoder on that token alone, until `<|im_end|>`.

# %%
stop = [tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")]
new = model.generate(ids[None], sample.pixel_values, max_new_tokens=8, stop_ids=stop)
answer = tokenizer.decode(new[0].tolist(), skip_special_tokens=True).strip()
print(f"answer: {answer!r} (expected {expected!r})")
assert new[0, 0].item() == next_id
