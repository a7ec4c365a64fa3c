"""Held-out exact match of a model on the synthetic M4 tasks, split by what each question turns on.

    python benchmarks/m4_breakdown.py models/m4-tiny out/m4-tiny/data

DATA is a folder written by data/make_m4.py. Every record of DATA/val.json is answered greedily by train.py's own
evaluation (train.evaluate) and scored per family and per kind: multi_image by what the odd picture differs in (shape or
colour), multi_patch by the mark's shape, video by the direction, multi_view by the number of solids. The embedded
model's README reports these splits: they show which part of a task the model has not learned.
"""
import argparse
import collections
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import interleave  # noqa: E402
import train  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="checkpoint folder (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("data", help="folder with val.json and its pictures")
    a = p.parse_args()
    model, tokenizer = interleave.load(a.model), interleave.load_tokenizer(a.model)
    records = json.load(open(os.path.join(a.data, "val.json")))
    for r in records:   # train.evaluate scores per metadata.task: make that "family / kind"
        task, expected = r["metadata"]["task"], r["conversations"][1]["value"].strip()
        kind = r["metadata"]["differs_in"] if task == "multi_image" else expected
        r["metadata"]["task"] = f"{task} / {kind}"
    counts = collections.Counter(r["metadata"]["task"] for r in records)
    accuracy = train.evaluate(model, records, train.Config(image_folder=a.data), tokenizer, print, torch.device("cpu"),
                              0, lambda *_, **__: None)["accuracy"]
    rows = collections.defaultdict(lambda: [0, 0])   # "family / kind" and "family" -> [right, records]
    for key, n in counts.items():
        for row in (key, key.split(" / ")[0]):
            rows[row][0] += round(accuracy[key] * n)
            rows[row][1] += n
    for key, (right, n) in sorted(rows.items()):
        print(f"{key:24s} {right:3d} of {n:3d}  {100 * right / n:5.1f}%")


if __name__ == "__main__":
    main()
