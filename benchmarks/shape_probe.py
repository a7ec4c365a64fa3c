"""Can the embedded model's vision tower tell circle, square and triangle apart when it is trained on them directly?

    python benchmarks/shape_probe.py DATA --pictures multi_image --patch 16 --layers 2

DATA is a folder written by data/make_m4.py (the embedded model's run drew its own into OUT/data). Pictures and
shapes come from its perception records: multi_image, the three pictures that "Describe the images." asks about
("red circle, red square, red circle"); mark_tiles, the 64-pixel multi-patch tile that holds the centre of the
small mark ("Describe the small mark."), found as the mean of its saturated pixels: the tile the tower sees the mark
in. 4,000 pictures, the first 3,500 to train on and 500 held out. The tower of train.py's "tiny" preset (--patch and
--layers change it) and a linear head on its mean feature are trained by AdamW (lr 1e-3, batch 64, 1,500 steps,
seed 0); the held-out accuracy is printed every 250 steps. End to end the tower learns the shapes only through the
decoder's answers: this tells apart "the tower cannot see them" from "the signal reaches it too slowly".
"""
import argparse
import json
import os
import sys

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import interleave  # noqa: E402
import train  # noqa: E402
from pretrain_tower import SHAPES, mark_tile  # noqa: E402


def pictures(data, kind, n=4000):
    """(pixels (n, 3, 64, 64), shape indices (n,)) from the perception records of DATA/train.json."""
    xs, ys = [], []
    for r in json.load(open(os.path.join(data, "train.json"))):
        answer = r["conversations"][1]["value"]
        if r["metadata"]["asks"] != "perception" or r["metadata"]["task"] != kind.replace("mark_tiles", "multi_patch"):
            continue
        if kind == "multi_image":   # "Describe the images." -> "red circle, red square, red circle"
            found = [(Image.open(os.path.join(data, path)), described.split()[1])
                     for path, described in zip(r["image"], answer.split(", "))]
        else:   # the tile (64 x 64, as multi-patch cuts them) that holds the mark
            found = [(mark_tile(Image.open(os.path.join(data, r["image"])), 64), answer.split()[1])]
        for image, shape in found:
            xs.append(interleave.image_to_pixels(image, 64))
            ys.append(SHAPES.index(shape))
        if len(xs) >= n:
            return torch.stack(xs[:n]), torch.tensor(ys[:n])
    return torch.stack(xs), torch.tensor(ys)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data")
    p.add_argument("--pictures", choices=["multi_image", "mark_tiles"], default="multi_image")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    a = p.parse_args()
    torch.manual_seed(0)
    x, y = pictures(a.data, a.pictures)
    (x_train, y_train), (x_test, y_test) = (x[:3500], y[:3500]), (x[3500:], y[3500:])
    cfg = dict(train.PRESETS["tiny"][0], patch_size=a.patch, layers=a.layers)
    tower, head = interleave.VisionTower(interleave.VisionConfig(**cfg)), torch.nn.Linear(cfg["hidden"], 3)
    opt = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.05)
    for step in range(1, 1501):
        i = torch.randint(0, len(x_train), (64,))
        loss = torch.nn.functional.cross_entropy(head(tower(x_train[i]).mean(1)), y_train[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0:
            with torch.no_grad():
                accuracy = (head(tower(x_test).mean(1)).argmax(-1) == y_test).float().mean().item()
            print(f"{a.pictures}, patch {a.patch}, {a.layers} layers: step {step}, training loss {loss.item():.3f}, "
                  f"held-out shape accuracy {100 * accuracy:.1f}%", flush=True)


if __name__ == "__main__":
    main()
