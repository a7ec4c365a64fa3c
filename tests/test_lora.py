"""LoRA in train.py (issue 19), on the embedded model models/m4-tiny, and the memory plan: step 0 is the base model,
only the adapters train, the merged export is the adapted model, the adapter file is PEFT's layout and gives PEFT's
logits, resume reproduces the losses, gradient checkpointing composes, a short fine-tune lowers the held-out loss;
the memory plan against a hand computation, and its refusal."""
import copy
import json
import os
import re
import shutil
import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import interleave
import train
from data import make_m4
from helpers import golden_path, max_diff

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
M4_TINY = os.path.join(ROOT, "models", "m4-tiny")
TARGETS = {"self_attn": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m4")
    make_m4.main(["--out", str(folder), "--train", "4", "--val", "1", "--seed", "1"])   # 16 training records
    return folder


def lora_args(data, out, *extra):
    return ["--init", M4_TINY, "--data", str(data / "train.json"), "--out", str(out), "--lora", "8",
            "--batch", "4", "--lr", "3e-3", "--warmup", "1", "--eval-every", "0", *map(str, extra)]


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """4 LoRA steps (rank 8) on models/m4-tiny, checkpoints every 2 steps, and an export."""
    out = tmp_path_factory.mktemp("lora")
    return out, train.main(lora_args(data, out, "--steps", 4, "--save-every", 2, "--export", out / "export"))


def logits_of(model, data):
    """The model's logits on a held-out multi-image record of the m4 fixture."""
    tokenizer = interleave.load_tokenizer(M4_TINY)
    record = next(r for r in json.loads((data / "val.json").read_text()) if r["metadata"]["task"] == "multi_image")
    sample = interleave.record_to_sample(record, str(data), tokenizer, model.config)
    with torch.no_grad():
        return model.eval()(sample.input_ids[None], sample.pixel_values, sample.image_sizes)


def test_at_step_0_the_adapted_model_gives_the_base_models_logits_exactly(data):
    base = interleave.load(M4_TINY, dtype=torch.float32)
    adapted = interleave.load(M4_TINY, dtype=torch.float32)
    trained = train.add_lora(adapted, train.Config(lora=8), [], bf16_base=False)
    assert len(trained) == 2 * 7 * 4 and all(p.requires_grad for p in trained)   # A and B, 7 linears, 4 blocks
    assert not [name for name, p in adapted.named_parameters() if p.requires_grad and ".lora_" not in name]
    assert torch.equal(logits_of(adapted, data), logits_of(base, data))


def test_on_a_gpu_the_targeted_frozen_weights_are_kept_in_bf16(data):
    model = interleave.load(M4_TINY, dtype=torch.float32)
    train.add_lora(model, train.Config(lora=8, lora_targets="q_proj,down_proj"), [], bf16_base=True)
    block = model.decoder.layers[0]
    assert block.self_attn.q_proj.weight.dtype == block.down_proj.weight.dtype == torch.bfloat16
    assert block.self_attn.q_proj.lora_A.weight.dtype == torch.float32   # the trained adapters stay fp32
    assert block.up_proj.weight.dtype == model.lm_head.weight.dtype == torch.float32   # not targeted
    assert logits_of(model, data).dtype == torch.float32   # the fp32 evaluation runs through the bf16 weights


def test_lora_training_changes_the_adapters_only(run):
    out, result = run
    base = interleave.load(M4_TINY, dtype=torch.float32).state_dict()
    after = result["model"].state_dict()
    for name, value in base.items():
        assert torch.equal(after[name], value), name   # the base weights are bit-identical
    adapters = {name: value for name, value in after.items() if ".lora_" in name}
    assert len(adapters) == 2 * 7 * 4 and all(value.abs().sum() > 0 for value in adapters.values())


def test_the_merged_export_gives_the_adapted_models_logits(run, data):
    """In float64: in float32, x (W + s B A) and x W + s (x A) B round differently, by up to 1.6e-5 at these logits
    (up to 12; this model amplifies float32 rounding, as tests/goldens/make_m4tiny_golden.py says). In float64 only
    the rounding of the exported fp32 file remains."""
    out, result = run
    exported = interleave.load(out / "export", dtype=torch.float64)
    assert not [name for name, _ in exported.named_parameters() if "lora" in name]
    adapted = logits_of(copy.deepcopy(result["model"]).double(), data)
    base = logits_of(interleave.load(M4_TINY, dtype=torch.float64), data)
    assert (adapted - base).abs().max() > 1e-3   # the fine-tune moved the logits: the merge has something to do
    assert (logits_of(exported, data) - adapted).abs().max() <= 1e-5


def test_the_adapter_is_written_in_pefts_layout(run):
    out, _ = run
    folder = out / "export" / "adapter"
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        shapes = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    sizes = {"q_proj": (160, 160), "k_proj": (160, 160), "v_proj": (160, 160), "o_proj": (160, 160),
             "gate_proj": (160, 480), "up_proj": (160, 480), "down_proj": (480, 160)}   # (in, out) of m4-tiny
    expected = {}
    for layer in range(4):
        for group, names in TARGETS.items():
            for name in names:
                prefix = f"base_model.model.model.language_model.layers.{layer}.{group}.{name}"
                expected[prefix + ".lora_A.weight"] = [8, sizes[name][0]]
                expected[prefix + ".lora_B.weight"] = [sizes[name][1], 8]
    assert shapes == expected
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    assert config["bias"] == "none" and config["lora_dropout"] == 0
    pattern = config["target_modules"]
    assert re.fullmatch(pattern, "model.language_model.layers.3.mlp.down_proj")
    assert not re.fullmatch(pattern, "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj")
    assert not (out / "export" / "adapter_config.json").exists()   # transformers would apply it to the merged model


def test_an_adapter_file_read_back_gives_pefts_logits():
    """tests/goldens/lora: random rank-4 adapters for models/m4-tiny that train.write_adapter wrote, and the logits
    that peft (PeftModel.from_pretrained on transformers' LlavaForConditionalGeneration) gives with them, in float64
    (tests/goldens/make_lora_golden.py). train.py's adapted model, the adapters read back, gives the same."""
    golden = load_file(golden_path("m4tiny", "golden.safetensors"))
    model = interleave.load(M4_TINY, dtype=torch.float64)
    train.add_lora(model, train.Config(lora=4, lora_alpha=8), [], bf16_base=False)
    train.read_adapter(golden_path("lora"), model)
    with torch.no_grad():
        logits = model.eval()(golden["input_ids"], golden["pixel_values"].double())
    diff, bound = max_diff(logits, load_file(golden_path("lora", "golden.safetensors"))["logits"])
    assert diff <= bound, f"max|diff| {diff:.3g} > {bound:.3g}"


def test_resume_of_a_lora_run_reproduces_its_losses(run, data, tmp_path):
    out, result = run
    shutil.copytree(out / "step-000002", tmp_path / "step-000002")
    os.symlink("step-000002", tmp_path / "latest")
    resumed = train.main(lora_args(data, tmp_path, "--steps", 4, "--save-every", 2, "--resume"))
    assert resumed["history"] == result["history"]
    with pytest.raises(SystemExit, match="--lora 8: resume with those"):
        train.main(lora_args(data, tmp_path, "--steps", 6, "--resume", "--lora", 4))


def test_gradient_checkpointing_composes_with_lora(run, data, tmp_path):
    """Recomputing each block going backward gives the same losses (on the CPU, the same operations: exactly)."""
    out, result = run
    again = train.main(lora_args(data, tmp_path, "--steps", 4, "--save-every", 0, "--grad-ckpt"))
    assert again["history"] == result["history"]


def test_a_short_lora_fine_tune_lowers_the_held_out_loss(data, tmp_path):
    """A new answer format, "Answer: <the answer>", that the embedded model has never seen: 8 LoRA steps of 4
    records lower its held-out loss on the replies (when measured, from 13.87 to 8.37 a token)."""
    for split in ("train", "val"):
        records = json.loads((data / f"{split}.json").read_text())
        for record in records:
            reply = record["conversations"][1]
            reply["value"] = "Answer: " + reply["value"]
        (tmp_path / f"{split}.json").write_text(json.dumps(records))
    cfg = train.Config(image_folder=str(data), loss_on="replies")
    base = interleave.load(M4_TINY, dtype=torch.float32)
    val = json.loads((tmp_path / "val.json").read_text())
    before = train.evaluate(base, val, cfg, interleave.load_tokenizer(M4_TINY), train.SkippedRecords(),
                            torch.device("cpu"), 0, train.no_log)["loss"]
    result = train.main(["--init", M4_TINY, "--data", str(tmp_path / "train.json"), "--val", str(tmp_path / "val.json"),
                         "--image-folder", str(data), "--out", str(tmp_path / "out"), "--lora", "8",
                         "--loss-on", "replies", "--steps", "8", "--batch", "4", "--lr", "3e-2", "--warmup", "1",
                         "--eval-every", "0", "--save-every", "0"])
    after = result["evals"][-1]["loss"]
    assert after < 0.75 * before, (before, after)


def test_lora_options_that_cannot_work_are_refused(data, tmp_path):
    cases = [(["--lora-targets", "q_proj,fc1"], "--lora-targets 'q_proj,fc1': choose among"),
             (["--init", "tiny"], "--lora adapts a trained model"),
             (["--train-vision"], "drop --train-vision"),
             (["--fsdp"], "--lora and --fsdp together")]
    for extra, message in cases:
        with pytest.raises(SystemExit, match=re.escape(message)):
            train.main(lora_args(data, tmp_path / "out", "--steps", 1, *extra))


# ---- the memory plan, against a hand computation for models/m4-tiny's shapes

# Weights of models/m4-tiny, counted by hand from its config.json.
VISION = (128 * 3 * 16 * 16 + 128) + 16 * 128 + 2 * (256 + 4 * (128 * 128 + 128) + 256 + (128 * 512 + 512)
                                                     + (512 * 128 + 128)) + 256   # 497,280
PROJECTOR = (128 * 160 + 160) + (160 * 160 + 160)                                 # 46,400
BLOCK = 320 + 3 * (160 * 160 + 160) + 160 * 160 + 3 * 160 * 480                   # 333,600
DECODER = 512 * 160 + 4 * BLOCK + 160                                              # 1,416,480 (the head is tied)
EVERYTHING = VISION + PROJECTOR + 160 + DECODER                                    # 1,960,320 with image_newline
TRAINED = EVERYTHING - VISION                                                      # the tower is frozen
# Activations of a pack of 64 tokens in fp32, no recomputation: per block and token 4 bytes x (6 x 160 + 2 x 160 +
# 4 x 480), 4 blocks; the head's logits, 512 of them a token, 12 bytes each
ACTIVATIONS = 64 * 4 * 4 * (6 * 160 + 2 * 160 + 4 * 480) + 64 * 512 * 12          # 3,670,016


def test_the_memory_plan_matches_a_hand_computation():
    model = interleave.load(M4_TINY, dtype=torch.float32)
    cfg = train.Config(budget=64, lora=8)
    assert sum(p.numel() for p in model.parameters()) == EVERYTHING
    full = train.memory_plan(model, "full", 1, cfg, False, False)
    assert (full.weights, full.gradients, full.optimizer, full.activations) == (
        4 * EVERYTHING, 4 * TRAINED, 8 * TRAINED, ACTIVATIONS)
    # DDP over 2 processes: its buckets hold a second copy of the gradients
    assert train.memory_plan(model, "full", 2, cfg, False, False).gradients == 8 * TRAINED
    # LoRA rank 8: r (in + out) beside each of 7 linears a block, the frozen targets in bf16 with bf16
    adapters = 4 * 8 * (4 * (160 + 160) + 3 * (160 + 480))                             # 102,400
    targeted = 4 * (4 * 160 * 160 + 3 * 160 * 480)
    lora = train.memory_plan(model, "lora", 1, cfg, False, False)
    assert (lora.weights, lora.gradients, lora.optimizer) == (4 * EVERYTHING + 4 * adapters, 4 * adapters,
                                                              8 * adapters)
    lora16 = train.memory_plan(model, "lora", 1, cfg, False, True)
    assert lora16.weights == 4 * (EVERYTHING - targeted) + 2 * targeted + 4 * adapters
    # FSDP over 2: the fp32 state halved; gathered at once, the root's weights (outside the blocks) and two blocks
    fsdp = train.memory_plan(model, "fsdp", 2, cfg, False, False)
    root = EVERYTHING - 4 * BLOCK - (VISION - 98432 - 2048 - 256)
    assert (fsdp.weights, fsdp.gradients, fsdp.optimizer) == (2 * EVERYTHING + 4 * (root + 2 * BLOCK),
                                                              2 * TRAINED, 4 * TRAINED)
    # recomputation keeps each block's input (160 floats a token) and one block's activations
    ckpt = train.memory_plan(model, "full", 1, train.Config(budget=64, grad_ckpt=True), False, False)
    assert ckpt.activations == 64 * 4 * (4 * 160 + 6 * 160 + 2 * 160 + 4 * 480) + 64 * 512 * 12


def test_a_plan_that_does_not_fit_the_gpu_is_refused_with_the_fix(monkeypatch):
    """Totals by hand (fp32, 64-token packs): full 29,067,776 bytes; LoRA at the release's rank 64 24,618,496; FSDP
    over w GPUs 25,397,760 / w + 7,256,320 (2: 19,955,200; 3: 15,722,240)."""
    model = interleave.load(M4_TINY, dtype=torch.float32)
    cfg = train.Config(init=M4_TINY, budget=64, bf16=False)
    assert train.memory_plan(model, "full", 1, cfg, False, False).total == 29_067_776
    monkeypatch.setattr(train.dist, "get_world_size", lambda: 1)   # as in a run of one process
    gpu = types.SimpleNamespace(total_memory=25_000_000)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: gpu)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "a small GPU")
    lines = []
    with pytest.raises(interleave.InputError, match=r"0\.0 GiB of a small GPU: use --lora \(0\.0 GiB\) or --fsdp "
                                                    r"with >= 2 GPUs"):
        train.check_memory(model, cfg, torch.device("cuda"), lambda line, **_: lines.append(line))
    assert "memory plan per GPU, full, 1 process" in lines[0]
    gpu.total_memory = 16_000_000   # LoRA at rank 64 no longer fits, FSDP needs 3
    with pytest.raises(interleave.InputError, match=r"GPU: use --fsdp with >= 3 GPUs;"):
        train.check_memory(model, cfg, torch.device("cuda"), train.no_log)
    gpu.total_memory = 30_000_000   # fits
    train.check_memory(model, cfg, torch.device("cuda"), train.no_log)
    gpu.total_memory = 1
    train.check_memory(model, cfg, torch.device("cpu"), train.no_log)   # the CPU: never refused
