"""Held-out exact match of a model on the synthetic M4 tasks, split by what each question turns on.

    python benchmarks/m4_breakdown.py models/m4-tiny out/m4-tiny/data

DATA is a folder written by data/make_m4.py. Every record of DATA/val.json is answered greedily, as train.py's
evaluation does, and scored per family and per kind: multi_image by what the odd picture differs in (shape or
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="checkpoint folder (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("data", help="folder with val.json and its pictures")
    a = p.parse_args()
    model, tokenizer = interleave.load(a.model), interleave.load_tokenizer(a.model)
    stops = [tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
    hits = collections.defaultdict(list)
    for record in json.load(open(os.path.join(a.data, "val.json"))):
        sample = interleave.record_to_sample(record, a.data, tokenizer, model.config,
                                             anyres=model.config.has_image_newline)
        prompt = int((sample.labels != interleave.IGNORE).nonzero()[0])   # the reply starts where the labels do
        with torch.no_grad():
            new = model.generate(sample.input_ids[None, :prompt], sample.pixel_values, sample.image_sizes,
                                 max_new_tokens=8, stop_ids=stops)[0].tolist()
        answer = tokenizer.decode([t for t in new if t not in stops]).strip()
        expected = record["conversations"][1]["value"].strip()
        task = record["metadata"]["task"]
        kind = record["metadata"]["differs_in"] if task == "multi_image" else expected
        for key in (task, f"{task} / {kind}"):
            hits[key].append(answer == expected)
    for key, h in sorted(hits.items()):
        print(f"{key:24s} {sum(h):3d} of {len(h):3d}  {100 * sum(h) / len(h):5.1f}%")


if __name__ == "__main__":
    main()
