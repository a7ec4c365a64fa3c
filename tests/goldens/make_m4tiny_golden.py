"""The reference's logits for the embedded model models/m4-tiny, which train.py wrote in the llava-hf layout.

    cd /tmp && /tmp/refvenv/bin/python /work/main/tests/goldens/make_m4tiny_golden.py   # needs transformers

Run it outside the repository (the repository's kernels.py would shadow a package transformers probes for), and
again whenever models/m4-tiny is retrained. It feeds transformers' LlavaForConditionalGeneration fixed inputs (three
images' worth of random pixels and random text ids around their slots), in float64, and stores inputs and logits
in tests/goldens/m4tiny/golden.safetensors; tests/test_train.py checks that interleave.load gives the same logits in
float64, so the checkpoint train.py writes is read alike by both.
"""
import json
import os

import torch
import transformers
from safetensors.torch import save_file
from transformers import LlavaForConditionalGeneration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "models", "m4-tiny")
OUT = os.path.join(ROOT, "tests", "goldens", "m4tiny")

torch.manual_seed(0)
torch.set_num_threads(1)
config = json.load(open(os.path.join(MODEL, "config.json")))
slot, size = config["image_token_index"], config["vision_config"]["image_size"]
per_image = (size // config["vision_config"]["patch_size"]) ** 2
text = lambda n: torch.randint(4, 400, (n,)).tolist()   # noqa: E731  (0-3: the tokenizer's specials and <image>)
ids = torch.tensor([text(7) + [slot] * per_image + text(3) + [slot] * per_image + text(5) + [slot] * per_image
                    + text(9)])
pixels = torch.randn(3, 3, size, size).clamp(-1, 1)   # normalised pixels lie in [-1, 1]
# float64: a trained model amplifies float32 rounding at some slots (2026-11-28: transformers' float32 logits were
# 9.9e-5 off its own float64 ones at one image slot, ours 3.2e-5), and this golden is about reading the checkpoint.
model = LlavaForConditionalGeneration.from_pretrained(MODEL, dtype=torch.float64).eval()
with torch.no_grad():
    logits = model(input_ids=ids, pixel_values=pixels.double(), attention_mask=torch.ones_like(ids)).logits
os.makedirs(OUT, exist_ok=True)
save_file({"input_ids": ids, "pixel_values": pixels, "logits": logits.contiguous()},
          os.path.join(OUT, "golden.safetensors.tmp"), metadata={"transformers": transformers.__version__})
os.replace(os.path.join(OUT, "golden.safetensors.tmp"), os.path.join(OUT, "golden.safetensors"))
print(f"wrote {OUT}/golden.safetensors: logits {tuple(logits.shape)} from transformers {transformers.__version__}")
