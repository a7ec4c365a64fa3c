"""The memory plan of train.py (bytes per GPU) for the released shapes, built on the meta device (no download).

    python benchmarks/memory_plan.py [--budget 1024] [--lora 64]

For the 0.5B and the 7B release (docs/MODEL.md §1: Qwen1.5 decoders, hidden 1024 [4096], 24 [32] layers, 16 [32]
heads of 64 [128], as many KV heads, MLP 2816 [11008], the llava-hf vocabulary of 152000 rows, the 0.5B's head tied,
the 7B's not; the same SigLIP so400m tower of 26 layers and mlp2x_gelu projector), each of full fine-tuning on one
GPU, LoRA (rank --lora, alpha 16, the decoder's q/k/v/o and MLP projections) on one GPU and FSDP over 8 GPUs, with
train.py's defaults otherwise (bf16 autocast, --budget 1024 tokens a pack, tower frozen), and the total with
--grad-ckpt. Then what train.py would say to the 7B's full fine-tuning on an 80 GiB GPU. The README's table is this
script's output.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import interleave  # noqa: E402
import train  # noqa: E402

RELEASES = {
    "0.5B": dict(hidden=1024, intermediate=2816, heads=16, kv_heads=16, head_dim=64, layers=24, vocab=152000,
                 rope_theta=1e6, tie_embeddings=True),
    "7B": dict(hidden=4096, intermediate=11008, heads=32, kv_heads=32, head_dim=128, layers=32, vocab=152000,
               rope_theta=1e6, tie_embeddings=False),
}
RUNS = [("full", 1), ("lora", 1), ("fsdp", 8)]


def meta_model(text_fields):
    """The release's model on the meta device: shapes only, no memory."""
    config = interleave.ModelConfig(interleave.VisionConfig(), interleave.TextConfig(**text_fields), "hf")
    with torch.device("meta"):
        return interleave.LlavaInterleave(config)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--lora", type=int, default=64)
    args = p.parse_args()
    gib = 2 ** 30
    print("| model | mode | weights | gradients | AdamW | activations | total | total, --grad-ckpt |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for release, text_fields in RELEASES.items():
        model = meta_model(text_fields)
        count = sum(p.numel() for p in model.parameters())
        for mode, world in RUNS:
            cfg = train.Config(lora=args.lora, budget=args.budget)
            plan = train.memory_plan(model, mode, world, cfg, False, True)
            ckpt = train.memory_plan(model, mode, world, train.Config(lora=args.lora, budget=args.budget,
                                                                      grad_ckpt=True), False, True)
            label = {"full": "full, 1 GPU", "lora": f"LoRA r{args.lora}, 1 GPU", "fsdp": f"FSDP, {world} GPUs"}
            row = [plan.weights, plan.gradients, plan.optimizer, plan.activations, plan.total, ckpt.total]
            cells = " | ".join(f"{b / gib:.1f}" for b in row)
            print(f"| {release} ({count / 1e9:.2f} B weights) | {label[mode]} | {cells} |")
    model = meta_model(RELEASES["7B"])
    capacity = 80 * gib
    need = train.memory_plan(model, "full", 1, train.Config(budget=args.budget), False, True).total
    if need > capacity:
        print("\n7B, full, on an 80 GiB GPU: error: "
              + train.refusal(model, train.Config(budget=args.budget), 1, False, True, capacity, "an 80 GiB GPU"))


if __name__ == "__main__":
    main()
