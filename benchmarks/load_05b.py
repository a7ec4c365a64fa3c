"""Benchmark: load a random checkpoint with the exact 0.5B shapes and key names (lmms-lab original layout, bf16).

    python benchmarks/load_05b.py [--dir /tmp/interleave-0.5b-random] [--dtype bfloat16|float32]

Writes the checkpoint once (about 1.8 GB), then, in a fresh process for each measurement, times interleave.load and
reads the peak resident memory (VmHWM) after loading and after one forward pass over a prompt with one image,
which touches every weight. Not a test: the numbers go in the README.
"""
import argparse
import json
import os
import subprocess
import sys

import torch

SO400M = dict(hidden=1152, intermediate=4304, layers=26, image=384, patch=14)
QWEN_05B = dict(hidden=1024, intermediate=2816, layers=24, vocab=151936)


def shapes_05b():
    """Every tensor of lmms-lab/llava-next-interleave-qwen-0.5b with its shape (tied head: no lm_head)."""
    h, v = QWEN_05B["hidden"], SO400M["hidden"]
    shapes = {"model.embed_tokens.weight": (QWEN_05B["vocab"], h), "model.norm.weight": (h,), "model.image_newline": (h,)}
    for i in range(QWEN_05B["layers"]):
        p = f"model.layers.{i}."
        for n in "qkv":
            shapes[p + f"self_attn.{n}_proj.weight"], shapes[p + f"self_attn.{n}_proj.bias"] = (h, h), (h,)
        shapes[p + "self_attn.o_proj.weight"] = (h, h)
        shapes[p + "mlp.gate_proj.weight"] = shapes[p + "mlp.up_proj.weight"] = (QWEN_05B["intermediate"], h)
        shapes[p + "mlp.down_proj.weight"] = (h, QWEN_05B["intermediate"])
        shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (h,)
    t = "model.vision_tower.vision_tower.vision_model."
    shapes[t + "embeddings.patch_embedding.weight"] = (v, 3, SO400M["patch"], SO400M["patch"])
    shapes[t + "embeddings.patch_embedding.bias"] = (v,)
    shapes[t + "embeddings.position_embedding.weight"] = ((SO400M["image"] // SO400M["patch"]) ** 2, v)
    for j in range(SO400M["layers"]):
        p = f"{t}encoder.layers.{j}."
        for n in ("q", "k", "v", "out"):
            shapes[p + f"self_attn.{n}_proj.weight"], shapes[p + f"self_attn.{n}_proj.bias"] = (v, v), (v,)
        for n in ("layer_norm1", "layer_norm2"):
            shapes[p + f"{n}.weight"] = shapes[p + f"{n}.bias"] = (v,)
        shapes[p + "mlp.fc1.weight"], shapes[p + "mlp.fc1.bias"] = (SO400M["intermediate"], v), (SO400M["intermediate"],)
        shapes[p + "mlp.fc2.weight"], shapes[p + "mlp.fc2.bias"] = (v, SO400M["intermediate"]), (v,)
    shapes[t + "post_layernorm.weight"] = shapes[t + "post_layernorm.bias"] = (v,)
    shapes["model.mm_projector.0.weight"], shapes["model.mm_projector.0.bias"] = (h, v), (h,)
    shapes["model.mm_projector.2.weight"], shapes["model.mm_projector.2.bias"] = (h, h), (h,)
    return shapes


def write_checkpoint(folder):
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    config = {"architectures": ["LlavaQwenForCausalLM"], "model_type": "llava_qwen", "hidden_size": QWEN_05B["hidden"],
              "intermediate_size": QWEN_05B["intermediate"], "num_attention_heads": 16, "num_hidden_layers": 24,
              "num_key_value_heads": 16, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": 151936,
              "max_position_embeddings": 32768, "tie_word_embeddings": True, "hidden_act": "silu",
              "mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_projector_type": "mlp2x_gelu",
              "mm_hidden_size": 1152, "mm_vision_select_layer": -2, "mm_patch_merge_type": "spatial_unpad",
              "image_aspect_ratio": "anyres", "torch_dtype": "bfloat16",
              "image_grid_pinpoints": [[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]]}
    gen = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in shapes_05b().items()}
    save_file(tensors, os.path.join(folder, "model.safetensors.tmp"), metadata={"format": "pt"})
    os.replace(os.path.join(folder, "model.safetensors.tmp"), os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


MEASURE = r"""
import sys, time, torch
sys.path.insert(0, {root!r})
import interleave
torch.set_num_threads(2)
def rss():  # peak resident memory of this process in GiB; VmHWM starts afresh at exec, unlike ru_maxrss
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1]) / 2**20
base = rss()
t0 = time.perf_counter()
model = interleave.load({folder!r}, dtype={dtype})
t1 = time.perf_counter()
after_load = rss()
ids = torch.full((1, 729 + 16), model.config.image_token_id); ids[0, 729:] = torch.arange(16)
with torch.no_grad():
    model(ids, torch.zeros(1, 3, 384, 384))
print(f"{{t1 - t0:.2f}} {{base:.3f}} {{after_load:.3f}} {{rss():.3f}}")
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/interleave-0.5b-random")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    file = os.path.join(args.dir, "model.safetensors")
    if not os.path.exists(file):
        print(f"writing a random 0.5B-shaped checkpoint to {args.dir} ...", flush=True)
        write_checkpoint(args.dir)
    ckpt_gib = os.path.getsize(file) / 2**30
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = MEASURE.format(root=root, folder=args.dir, dtype=f"torch.{args.dtype}")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    load_s, base, after_load, after_forward = map(float, out)
    print(f"checkpoint: {ckpt_gib:.2f} GiB bf16; load as {args.dtype}: {load_s:.2f} s")
    print(f"peak RSS: {base:.2f} GiB after importing torch, {after_load:.2f} GiB after load, "
          f"{after_forward:.2f} GiB after one forward pass ({after_forward / ckpt_gib:.2f}x the checkpoint; "
          f"{(after_forward - base) / ckpt_gib:.2f}x without the interpreter and torch)")


if __name__ == "__main__":
    main()
