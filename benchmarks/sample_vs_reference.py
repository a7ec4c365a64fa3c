"""Benchmark: our generation against the reference implementation (transformers), end to end, side by side.

    python benchmarks/sample_vs_reference.py [--ref-python /tmp/refvenv/bin/python] [--device cpu|cuda] [--repeats 3]

One random checkpoint with the exact shapes of llava-hf/llava-interleave-qwen-0.5b-hf, in the hub's HF layout (bf16
files, written once to --dir), read by both. The same inputs for both: two 640x480 pictures and 30 text tokens
(2 x 729 image slots + 30 = 1488 prompt tokens), then 32 greedy new tokens with no stop. One run = preprocess the
two pictures + generate; timed from the PIL images to the last token. CPU: float32 and --threads threads; CUDA: bf16.

Each implementation runs in its own process (transformers only in --ref-python's environment; this repository is
never on that process's path), loaded one after the other; then the runs alternate between them, never at the same
time, so a change in machine load hits both alike. One untimed warm-up run each. Reported: medians. On CUDA ours
runs twice over: as generate does by default, decoding with a CUDA graph, and with cuda_graph=False (the
dynamic-shape decode step, one launch per kernel).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from load_05b import shapes_05b  # noqa: E402  (the original layout's keys and shapes)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_VOCAB, IMAGE_TOKEN = 152000, 151646
TO_HF = [("model.vision_tower.vision_tower.vision_model.", "vision_tower.vision_model."),   # original -> hub HF keys
         ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
         ("model.mm_projector.2.", "multi_modal_projector.linear_2."), ("model.", "language_model.model.")]
HF_CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "ignore_index": -100,
    "image_token_index": IMAGE_TOKEN, "projector_hidden_act": "gelu", "tie_word_embeddings": True,
    "vision_feature_layer": -1, "vision_feature_select_strategy": "full", "torch_dtype": "bfloat16",
    "text_config": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1024,
                    "intermediate_size": 2816, "num_attention_heads": 16, "num_hidden_layers": 24,
                    "num_key_value_heads": 16, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": HF_VOCAB,
                    "max_position_embeddings": 32768, "hidden_act": "silu", "tie_word_embeddings": True,
                    "use_sliding_window": False, "torch_dtype": "bfloat16"},
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 384,
                      "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 26, "patch_size": 14,
                      "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False},
}


def write_hf_checkpoint(folder, layers=None):
    """The 0.5B's tensors under the hub's HF names; layers=n keeps n layers of each tower (a quick smoke test)."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    gen, tensors, config = torch.Generator().manual_seed(0), {}, json.loads(json.dumps(HF_CONFIG))
    if layers:
        config["text_config"]["num_hidden_layers"] = config["vision_config"]["num_hidden_layers"] = layers
    for key, shape in shapes_05b().items():
        if key == "model.image_newline" or (layers and any(f"layers.{i}." in key for i in range(layers, 26))):
            continue   # the HF release has no image_newline
        prefix, hf = next((p, h) for p, h in TO_HF if key.startswith(p))
        shape = (HF_VOCAB, shape[1]) if key == "model.embed_tokens.weight" else shape
        tensors[hf + key[len(prefix):]] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    save_file(tensors, os.path.join(folder, "model.safetensors.tmp"), metadata={"format": "pt"})
    os.replace(os.path.join(folder, "model.safetensors.tmp"), os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


# One process per implementation: prints {"load_s"} once loaded, then for each line "N" on stdin one run of N new
# tokens as a JSON line. Runs with the cwd in a temporary folder: the repository's kernels.py must not shadow a
# package that transformers probes for.
WORKER = r"""
import json, sys, time
import numpy as np, torch
from PIL import Image
impl, folder, device, threads, root = sys.argv[1:6]
torch.set_num_threads(int(threads))
device = torch.device(device)
dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
rng = np.random.default_rng(0)
images = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(2)]
text, slots = list(range(1000, 1030)), [151646] * 729
ids = text[:10] + slots + text[10:15] + slots + text[15:]          # 30 text tokens around two images
start = time.perf_counter()
if impl.startswith("ours"):   # "ours" or "ours-no-graph"
    sys.path.insert(0, root)
    import interleave
    model = interleave.load(folder, device=device, dtype=dtype)
    pixels = lambda: torch.cat([interleave.preprocess(image, model.config) for image in images]).to(device)
    def generate(input_ids, pixel_values, n, on_token):
        return model.generate(input_ids, pixel_values, None, max_new_tokens=n, stop_ids=[], on_token=on_token,
                              cuda_graph=None if impl == "ours" else False)[0]
else:
    from transformers import LlavaForConditionalGeneration, SiglipImageProcessor
    from transformers.generation.streamers import BaseStreamer
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    processor = SiglipImageProcessor(size={"height": 384, "width": 384}, resample=3, image_mean=[0.5] * 3,
                                     image_std=[0.5] * 3)
    pixels = lambda: processor(images, return_tensors="pt")["pixel_values"].to(device, dtype)
    class Streamer(BaseStreamer):      # generate() puts the prompt first, then each new token
        def __init__(self, on_token):
            self.on_token, self.calls = on_token, 0
        def put(self, value):
            self.calls += 1
            if self.calls > 1:
                self.on_token(value)
        def end(self):
            pass
    def generate(input_ids, pixel_values, n, on_token):
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values,
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=Streamer(on_token),
                             pad_token_id=0)
        return out[0, input_ids.shape[1]:]
sync()
print(json.dumps({"load_s": time.perf_counter() - start}), flush=True)
for line in sys.stdin:
    n, first = int(line), []
    def on_token(token):
        if not first:
            sync()
            first.append(time.perf_counter())
    with torch.no_grad():
        sync()
        start = time.perf_counter()
        new = generate(torch.tensor([ids], device=device), pixels(), n, on_token).tolist()
        sync()
        end = time.perf_counter()
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else
            int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024) / 2**30
    print(json.dumps({"total_s": end - start, "ttft_s": first[0] - start,
                      "decode_tps": (len(new) - 1) / (end - first[0]), "peak_gib": peak, "tokens": new}), flush=True)
"""


class Worker:
    def __init__(self, python, impl, folder, device, threads, cwd):
        self.name = impl
        self.process = subprocess.Popen([python, "-c", WORKER, impl, folder, device, str(threads), ROOT], cwd=cwd,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.load_s, self.runs = self.read()["load_s"], []

    def read(self):
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.name} worker died (its error is above)")
        return json.loads(line)

    def run(self, new_tokens, keep=True):
        self.process.stdin.write(f"{new_tokens}\n")
        self.process.stdin.flush()
        result = self.read()
        if keep:
            self.runs.append(result)
        return result

    def median(self, key):
        return statistics.median(run[key] for run in self.runs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/interleave-0.5b-hf-random")
    parser.add_argument("--ref-python", default="/tmp/refvenv/bin/python", help="a Python with transformers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch in each process")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--smoke", action="store_true", help="2 layers per tower, 1 run: does the script work?")
    args = parser.parse_args()
    if args.smoke:
        args.dir, args.repeats = args.dir + "-smoke", 1
    if not os.path.exists(os.path.join(args.dir, "model.safetensors")):
        print(f"writing a random 0.5B-shaped checkpoint (HF layout) to {args.dir} ...", flush=True)
        write_hf_checkpoint(args.dir, layers=2 if args.smoke else None)
    impls = [("ours", sys.executable)] + [("ours-no-graph", sys.executable)] * (args.device == "cuda") + [
        ("reference", args.ref_python)]
    with tempfile.TemporaryDirectory() as cwd:
        workers = []
        for impl, python in impls:   # loaded one at a time, so that no load competes with another
            workers.append(Worker(python, impl, args.dir, args.device, args.threads, cwd))
            print(f"{impl}: loaded in {workers[-1].load_s:.1f} s", flush=True)
            workers[-1].run(args.new_tokens, keep=False)   # warm-up
        for repeat in range(args.repeats):
            for worker in workers:
                result = worker.run(args.new_tokens)
                print(f"run {repeat + 1} {worker.name}: {result['total_s']:.2f} s", flush=True)
        for worker in workers:
            worker.process.stdin.close()
            worker.process.wait()
    ours, ref = workers[0], workers[-1]
    print(f"\n{args.device}, {'float32' if args.device == 'cpu' else 'bfloat16'}"
          + (f", {args.threads} threads" if args.device == "cpu" else "")
          + f"; 2 images x 729 slots + 30 text tokens, {args.new_tokens} greedy new tokens; median of {args.repeats}")
    names = {"ours": "our generate", "ours-no-graph": "our generate, no CUDA graph", "reference": "transformers"}
    print("| implementation | import + load | end to end (one run) | load + run | first token | decode tokens/s "
          "| peak memory |\n|---|---|---|---|---|---|---|")
    for w in workers:
        print(f"| {names[w.name]} | {w.load_s:.1f} s | {w.median('total_s'):.2f} s | "
              f"{w.load_s + w.median('total_s'):.1f} s | {w.median('ttft_s'):.2f} s | {w.median('decode_tps'):.2f} | "
              f"{max(r['peak_gib'] for r in w.runs):.2f} GiB |")
    for w in workers[:-1]:
        print(f"{names[w.name]} vs transformers: end to end {ref.median('total_s') / w.median('total_s'):.2f}x as "
              f"fast (load + run {(ref.load_s + ref.median('total_s')) / (w.load_s + w.median('total_s')):.2f}x), "
              f"decode {w.median('decode_tps') / ref.median('decode_tps'):.2f}x; "
              f"same tokens: {w.runs[0]['tokens'] == ref.runs[0]['tokens']}")


if __name__ == "__main__":
    main()
