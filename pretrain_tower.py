"""Stage 0 of the tiny model: pretrain its vision tower on labelled pictures, as the release starts from a pretrained
SigLIP (LLaVA never trains its vision encoder from scratch).

    python train.py --init tiny --synthetic 12000 --pretrain-tower 2500 ...   # train.py calls pretrain() first

Why: trained end to end from scratch, the tiny tower learns the shapes only through the decoder's replies, and
slowly: after 3,500 steps of train.py it named the shape of a held-out multi-image picture 57% of the time (colour
100%). Trained directly, with a linear head on the mean of its features, the same tower names it 96-97% of the time
after 2,500 steps of 64 pictures (2.5 minutes on one CPU thread, 33 s of it drawing). The pictures are drawn by
data/make_m4.py (split "pretrain", so never the training or held-out pictures): the three of each multi-image example
and the 64-pixel tile that holds each small mark; the labels are their shape and colour. The two heads are thrown
away; the tower goes on training with the rest of the model.
"""
import sys

import numpy as np
import torch
import torch.nn.functional as F

import interleave
from data import make_m4

SHAPES, COLOURS = list(make_m4.SHAPES), list(make_m4.COLOURS)


def mark_tile(image, size):
    """The size x size multi-patch tile of a make_m4 multi-patch picture that holds the centre of its small mark (the
    mean of the only saturated pixels: the background is grey)."""
    rgb = np.asarray(image.convert("RGB")).astype(int)
    rows, cols = np.nonzero(rgb.max(-1) - rgb.min(-1) > 60)
    left, top = int(cols.mean() // size) * size, int(rows.mean() // size) * size
    return image.crop((left, top, left + size, top + size))


def labelled_pictures(count, seed, size):
    """(pixels (n, 3, size, size), shape indices (n,), colour indices (n,)): 3 pictures per multi-image example and the
    mark's tile of each multi-patch example, `count` examples of each."""
    pixels, shapes, colours = [], [], []
    for i in range(count):
        for task in ("multi_image", "multi_patch"):
            images, _, _, _, about = make_m4.make_example(task, seed, "pretrain", i, size)
            described = about[0][1].split(", ")   # "red circle, red square, red circle" or "blue triangle"
            if task == "multi_patch":
                images = [mark_tile(images[0], size)]
            for image, words in zip(images, described):
                colour, shape = words.split()
                pixels.append(interleave.image_to_pixels(image, size))
                shapes.append(SHAPES.index(shape))
                colours.append(COLOURS.index(colour))
    return torch.stack(pixels), torch.tensor(shapes), torch.tensor(colours)


def pretrain(model, steps, seed, log=print, batch=64, lr=1e-3, count=6000, held_out=500):
    """Train model.vision in place, `steps` AdamW steps on shape and colour; return the model (0 steps: unchanged)."""
    tower, size = model.vision, model.vision.config.image_size
    if not steps:
        return model
    if size > 128:   # count * 4 pictures are held in memory: 24,000 at 384 pixels would take 42 GB
        sys.exit(f"--pretrain-tower is made for the tiny preset's 64-pixel tower, not a {size}-pixel one")
    pixels, shapes, colours = labelled_pictures(count, seed, size)
    n = len(pixels) - held_out   # the last pictures only measure what the tower learned
    heads = torch.nn.ModuleList([torch.nn.Linear(tower.config.hidden, len(SHAPES)),
                                 torch.nn.Linear(tower.config.hidden, len(COLOURS))])
    optimizer = torch.optim.AdamW([*tower.parameters(), *heads.parameters()], lr=lr, weight_decay=0.05)
    order = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, n, (batch,), generator=order)
        features = tower(pixels[i]).mean(1)   # (batch, hidden): the mean over the picture's tokens
        loss = F.cross_entropy(heads[0](features), shapes[i]) + F.cross_entropy(heads[1](features), colours[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        features = tower(pixels[n:]).mean(1)
        shape_right, colour_right = [(head(features).argmax(-1) == labels[n:]).float().mean().item()
                                     for head, labels in zip(heads, (shapes, colours))]
    log(f"pretrained the vision tower: {steps} steps on {n} pictures; on {held_out} others it names the shape "
        f"{100 * shape_right:.1f}% and the colour {100 * colour_right:.1f}% of the time", flush=True)
    return model
