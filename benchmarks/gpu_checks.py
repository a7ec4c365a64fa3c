"""The model on a GPU: tests/test_parity.py's golden checks run on CUDA for each attention path, plus packing.

    python benchmarks/gpu_checks.py [cpu]    # CUDA by default: benchmarks/gpu_session.sh runs it when a GPU is lent

CI has no GPU, so these checks live here and their results in the README. Each line prints max|diff| against the
reference's golden values and the parity bound (tests/test_parity.py: 1e-5 + 2e-6 max|ref|). fp32 runs twice: with
PyTorch's defaults (TF32 allowed in cuDNN's convolutions, not in matmuls) and with TF32 off everywhere. bf16 is
compared by relative norm error and by how many of the 8 golden greedy tokens it reproduces. Last, generate's CUDA
graph (its default on CUDA) against the eager decode steps: the same greedy tokens, and tokens/s with and without.
"""
import os
import sys
import time
from unittest import mock

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import interleave  # noqa: E402
from helpers import max_diff  # noqa: E402
from test_parity import GOLDENS, golden, model_inputs  # noqa: E402

DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cuda"   # cpu: a smoke test of this script (Triton interpreted)
failures = []


def check(what, ours, ref):
    diff, bound = max_diff(ours.float().cpu(), ref)
    ok = diff <= bound
    failures.extend([] if ok else [what])
    print(f"{'ok  ' if ok else 'FAIL'} {what:58} max|diff| {diff:.2e} (bound {bound:.2e})", flush=True)


def parity(variant, layout, attn, tf32):
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32, False   # tf32: the defaults
    g, tag = golden(variant), f"{variant}/{layout} fp32 {attn}{' tf32 default' if tf32 else ''}"
    model = interleave.load(os.path.join(GOLDENS, variant, layout), device=DEVICE, attn=attn)
    with torch.no_grad():
        for case in ("two_images", "batch2", "text_only"):
            ids, pixels = model_inputs(model, g, case)
            pixels = None if pixels is None else pixels.to(DEVICE)
            if pixels is not None:
                check(f"{tag} {case} vision", model.vision(pixels), g[f"{case}.vision_features"])
            check(f"{tag} {case} logits", model(ids.to(DEVICE), pixels), g[f"{case}.logits"])
    ids, pixels = model_inputs(model, g, "two_images")
    tokens = model.generate(ids.to(DEVICE), pixels.to(DEVICE), max_new_tokens=8, stop_ids=()).cpu()
    same = tokens.tolist() == g["two_images.greedy"].tolist()
    failures.extend([] if same else [f"{tag} greedy"])
    print(f"{'ok  ' if same else 'FAIL'} {tag} cached greedy tokens == reference: {same}", flush=True)


def bf16_drift(variant, layout, attn):
    g = golden(variant)
    model = interleave.load(os.path.join(GOLDENS, variant, layout), device=DEVICE, dtype=torch.bfloat16, attn=attn)
    ids, pixels = model_inputs(model, g, "two_images")
    with torch.no_grad():
        logits = model(ids.to(DEVICE), pixels.to(DEVICE)).float().cpu()
    ref = g["two_images.logits"]
    tokens = model.generate(ids.to(DEVICE), pixels.to(DEVICE), max_new_tokens=8, stop_ids=())[0].cpu()
    agree = (tokens == g["two_images.greedy"][0]).sum().item()
    error = ((logits - ref).norm() / ref.norm()).item()
    print(f"info {variant}/{layout} bf16 {attn}: logits |diff|/|ref| {error:.2e}, "
          f"greedy tokens equal to the fp32 reference's: {agree}/8", flush=True)


def packed_equals_alone(dtype, attn):
    """The golden inputs as 4 samples packed into one sequence: each sample's logits as when it runs alone."""
    g = golden("untied")
    model = interleave.load(os.path.join(GOLDENS, "untied", "hf"), device=DEVICE, dtype=dtype, attn=attn)
    samples = []
    for case in ("two_images", "batch2", "text_only"):
        ids, pixels = model_inputs(model, g, case)
        for row in range(ids.shape[0]):
            px = None if pixels is None else pixels[2 * row: 2 * row + 2] if case == "two_images" else \
                pixels[row: row + 1]
            samples.append(interleave.Sample(ids[row], torch.full_like(ids[row], -100), px,
                                             [None] * (0 if px is None else len(px))))
    pack, = interleave.pack_samples(samples, budget=1024, verbose=False)
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    with torch.no_grad():
        packed = model(dev(pack.input_ids[None]), dev(pack.pixel_values), pack.image_sizes,
                       dev(pack.position_ids[None]), dev(pack.cu_seqlens))[0].float()
        order = sorted(samples, key=lambda s: -len(s.input_ids))
        worst = 0.0
        for i, s in enumerate(order):
            alone = model(dev(s.input_ids[None]), dev(s.pixel_values), s.image_sizes)[0].float()
            worst = max(worst, (packed[pack.cu_seqlens[i]:pack.cu_seqlens[i + 1]] - alone).abs().max().item())
    if dtype != torch.float32:   # bf16: other matrix shapes round differently; reported, not judged
        return print(f"info packed vs alone, bf16 {attn}: max|diff| {worst:.2e}", flush=True)
    failures.extend([] if worst <= 1e-5 else [f"packed fp32 {attn}"])
    print(f"{'ok  ' if worst <= 1e-5 else 'FAIL'} packed == alone, fp32 {attn}: max|diff| {worst:.2e} (bound 1e-05)",
          flush=True)


def timed_generate(model, ids, pixels, new_tokens, cuda_graph):
    """(tokens, decode tokens/s after the first token); a CUDA graph is captured before the first token."""
    sync, first = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None), []

    def on_token(token):
        if not first:
            sync()
            first.append(time.perf_counter())
    tokens = model.generate(ids.to(DEVICE), pixels.to(DEVICE), max_new_tokens=new_tokens, stop_ids=(),
                            on_token=on_token, cuda_graph=cuda_graph)
    sync()
    return tokens.cpu(), (new_tokens - 1) / (time.perf_counter() - first[0])


def graph_equals_dynamic(dtype, new_tokens=64):
    """Greedy decoding with the decode step captured as a CUDA graph (generate's default on CUDA) against the same
    fixed-shape step run eagerly, which it must reproduce exactly, and against the dynamic-shape step (cuda_graph=
    False). That one attends with the model's kernel (Triton), the fixed-shape step with plain attention: fp32 must
    agree; in bf16 rounding flips near-ties of the tiny random model, so the first difference is only reported."""
    model = interleave.load(os.path.join(GOLDENS, "untied", "hf"), device=DEVICE, dtype=dtype)
    for case in ("two_images", "batch2"):
        ids, pixels = model_inputs(model, golden("untied"), case)
        for cuda_graph in (True, False):   # warm-ups (Triton's compiles, cuBLAS), untimed
            timed_generate(model, ids, pixels, new_tokens, cuda_graph)
        (graph, graph_tps), (dynamic, dynamic_tps) = (timed_generate(model, ids, pixels, new_tokens, cuda_graph)
                                                      for cuda_graph in (True, False))
        with mock.patch.object(torch.cuda, "make_graphed_callables", lambda step, inputs, **kw: step):
            eager, _ = timed_generate(model, ids, pixels, new_tokens, True)   # the fixed-shape step, not captured
        what = f"{str(dtype).removeprefix('torch.')} {case} x{new_tokens} tokens"
        for name, other, judged in (("the same step eagerly", eager, True),
                                    ("the dynamic-shape step", dynamic, dtype == torch.float32)):
            same = graph.tolist() == other.tolist()
            first = (graph != other).any(0).int().argmax().item()
            failures.extend([] if same or not judged else [f"graph vs {name}, {what}"])
            print(f"{'PASS' if same else 'FAIL' if judged else 'info'} CUDA graph == {name}, greedy tokens, {what}"
                  + ("" if same else f": first difference at token {first}"), flush=True)
        print(f"info {what}: decode {graph_tps:.0f} tokens/s with the CUDA graph, {dynamic_tps:.0f} without",
              flush=True)


if __name__ == "__main__":
    print(f"{torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu'}, torch {torch.__version__}", flush=True)
    for variant, layout in (("tied", "original"), ("untied", "hf"), ("layer2", "hf_new")):
        for attn in ("plain", "sdpa", "triton"):
            parity(variant, layout, attn, tf32=False)
    parity("untied", "hf", "triton", tf32=True)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    for attn in ("sdpa", "triton"):
        bf16_drift("untied", "hf", attn)
        for dtype in (torch.float32, torch.bfloat16):
            packed_equals_alone(dtype, attn)
    for dtype in (torch.float32, torch.bfloat16):
        graph_equals_dynamic(dtype)
    print(f"gpu_checks: {len(failures)} failed" + (": " + ", ".join(failures) if failures else ""))
    sys.exit(1 if failures else 0)
