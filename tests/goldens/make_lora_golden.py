"""PEFT's logits for models/m4-tiny with a LoRA adapter that train.py wrote in PEFT's layout.

    cd /tmp && /tmp/peftvenv/bin/python /work/main/tests/goldens/make_lora_golden.py   # needs transformers, peft

Run it outside the repository (the repository's kernels.py would shadow a package transformers probes for). It puts
rank-4 adapters (alpha 8) with random values beside every decoder linear of models/m4-tiny (train.add_lora), writes
them with train.write_adapter into tests/goldens/lora/ (adapter_config.json, adapter_model.safetensors), and has
peft load that folder onto transformers' LlavaForConditionalGeneration (PeftModel.from_pretrained). Its logits, in
float64, on the inputs of tests/goldens/m4tiny/golden.safetensors, go to tests/goldens/lora/golden.safetensors;
tests/test_lora.py checks that train.py's adapted model, its adapters read back from the file, gives them. It also
prints how far transformers' logits for train.py's merged export (write_model) are from PEFT's merged model's.
"""
import os
import sys
import tempfile

import peft
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "models", "m4-tiny")
OUT = os.path.join(ROOT, "tests", "goldens", "lora")
sys.path.insert(0, ROOT)   # after transformers is imported

import interleave  # noqa: E402
import train  # noqa: E402

torch.set_num_threads(1)
inputs = load_file(os.path.join(ROOT, "tests", "goldens", "m4tiny", "golden.safetensors"))
ids = inputs["input_ids"]
pixels = inputs["pixel_values"].double()

# ---- ours: random adapters (B nonzero, or the test would be trivial), written in PEFT's layout
ours = interleave.load(MODEL, dtype=torch.float64)
cfg = train.Config(lora=4, lora_alpha=8, seed=0)
adapters = train.add_lora(ours, cfg, [], bf16_base=False)
generator = torch.Generator().manual_seed(0)
with torch.no_grad():
    for p in adapters:
        # float32 values, which the fp32 file holds exactly
        p.copy_(0.1 * torch.randn(p.shape, generator=generator))
os.makedirs(OUT, exist_ok=True)
train.write_adapter(OUT, ours)

# ---- PEFT's: the adapter folder loaded onto transformers' model
base = LlavaForConditionalGeneration.from_pretrained(MODEL, dtype=torch.float64).eval()
adapted = PeftModel.from_pretrained(base, OUT).eval()
with torch.no_grad():
    logits = adapted(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits
    ours_logits = ours.eval()(ids, pixels)
print(f"train.py's adapted model vs PEFT: max |diff| {(ours_logits - logits).abs().max().item():.3g}")
save_file({"logits": logits.contiguous()}, os.path.join(OUT, "golden.safetensors.tmp"),
          metadata={"transformers": transformers.__version__, "peft": peft.__version__})
os.replace(os.path.join(OUT, "golden.safetensors.tmp"), os.path.join(OUT, "golden.safetensors"))

# ---- the merged export, read by transformers, against PEFT's own merge
with tempfile.TemporaryDirectory() as folder:
    train.write_model(folder, ours, interleave.load_tokenizer(MODEL))
    merged = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float64).eval()
    with torch.no_grad():
        exported = merged(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits
        peft_merged = adapted.merge_and_unload()(input_ids=ids, pixel_values=pixels,
                                                 attention_mask=torch.ones_like(ids)).logits
print(f"train.py's merged export (transformers) vs PEFT's merge_and_unload: "
      f"max |diff| {(exported - peft_merged).abs().max().item():.3g}; vs PEFT unmerged "
      f"{(exported - logits).abs().max().item():.3g}; logits up to {logits.abs().max().item():.3g}")
