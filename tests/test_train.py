"""train.py on CPU: the loss goes down, resume reproduces the loss curve, two gloo processes match one, checkpoints
load back (interleave.load) with identical logits and give transformers' logits, fine-tuning keeps the tower frozen, bad records and NaN losses."""
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import interleave
import train
from data import make_m4
from helpers import golden_path, max_diff, write_tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = {"multi_image", "video", "multi_view", "multi_patch"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m4")
    make_m4.main(["--out", str(folder), "--train", "4", "--val", "1", "--seed", "0"])   # 16 training records
    return folder


def test_synthetic_data_does_not_depend_on_the_number_of_drawing_processes(data, tmp_path):
    make_m4.main(["--out", str(tmp_path), "--train", "4", "--val", "1", "--seed", "0", "--workers", "1"])
    for split in ("train.json", "val.json"):   # the fixture drew the same records with the default processes
        assert (tmp_path / split).read_text() == (data / split).read_text()
    pictures = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.png"))
    assert len(pictures) > 16 and pictures == sorted(p.relative_to(data) for p in data.rglob("*.png"))
    assert all((tmp_path / p).read_bytes() == (data / p).read_bytes() for p in pictures)


def test_the_small_mark_lies_inside_one_tile_and_perception_names_every_picture():
    for i in range(40):   # drawn anywhere, one mark in six was cut in two by the tiles' edges
        images, _, shape, _, about = make_m4.make_example("multi_patch", 0, "train", i)
        rgb = np.asarray(images[0]).astype(int)
        rows, cols = np.nonzero(rgb.max(-1) - rgb.min(-1) > 60)   # the mark's saturated pixels
        assert rows.min() // 64 == rows.max() // 64 and cols.min() // 64 == cols.max() // 64, (i, images[0].size)
        assert about == [("Describe the small mark.", about[0][1])] and about[0][1].endswith(" " + shape)
    for i in range(10):
        _, _, odd, meta, about = make_m4.make_example("multi_image", 0, "train", i)
        described = [words.split() for words in about[0][1].split(", ")]   # "red circle, red square, red circle"
        assert about[0][0] == "Describe the images." and len(described) == 3
        part = ["colour", "shape"].index(meta["differs_in"])
        others = [d[part] for k, d in enumerate(described) if k != int(odd) - 1]
        assert others[0] == others[1] != described[int(odd) - 1][part], (i, about)


def test_pretraining_the_tower_trains_the_tower_only(data, monkeypatch):
    tokenizer = train.train_tokenizer(json.loads((data / "train.json").read_text()))
    monkeypatch.setattr(train, "pretrain", functools.partial(train.pretrain, count=60, held_out=60))
    before, logged = train.fresh_model("tiny", tokenizer, 0), []
    after = train.fresh_model("tiny", tokenizer, 0, 100, lambda line, **_: logged.append(line))   # 180 pictures
    for (name, a), b in zip(before.named_parameters(), after.parameters()):
        moved = name.startswith("vision.") and not name.startswith("vision.post_layernorm")   # that is never applied
        assert torch.equal(a, b) != moved, name
    colour = float(re.search(r"the colour ([0-9.]+)%", logged[0]).group(1))
    assert colour >= 90, logged   # held-out pictures; 25% is chance, the shapes take thousands of steps
    small = types.SimpleNamespace(vision=interleave.VisionTower(interleave.VisionConfig(
        hidden=32, intermediate=64, heads=2, layers=1, image_size=384, patch_size=32)))
    with pytest.raises(SystemExit, match="64-pixel tower, not a 384-pixel one"):
        train.pretrain(small, 10, 0)


def args(data, out, *extra):
    return ["--init", "tiny", "--data", str(data / "train.json"), "--val", str(data / "val.json"), "--out", str(out),
            "--batch", "8", "--lr", "3e-3", "--warmup", "2", "--eval-every", "0", *map(str, extra)]


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """12 steps of the tiny configuration, checkpoints every 6 steps."""
    out = tmp_path_factory.mktemp("run")
    return out, train.main(args(data, out, "--steps", 12, "--save-every", 6))


def test_a_few_steps_lower_the_loss(run):
    out, result = run
    losses = [loss for _, loss in result["history"]]
    assert len(losses) == 12 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0], losses
    final = result["evals"][-1]   # the final evaluation covers every task family of the held-out split
    assert set(final["accuracy"]) == TASKS and final["loss"] < losses[0]
    assert sorted(os.listdir(out)) == ["latest", "loss.png", "step-000006", "step-000012"]
    assert os.readlink(out / "latest") == "step-000012"


def test_checkpoint_loads_back_with_identical_logits(run, data):
    out, result = run
    model, tokenizer = result["model"].eval(), result["tokenizer"]
    loaded = interleave.load(out / "latest")
    assert loaded.config.has_image_newline and loaded.config.grid_pinpoints == model.config.grid_pinpoints
    for anyres in (False, True):   # plain images, and multi-patch (which needs image_newline)
        record = next(r for r in json.loads((data / "val.json").read_text())
                      if (r["metadata"]["task"] == "multi_patch") == anyres)
        sample = interleave.record_to_sample(record, str(data), tokenizer, model.config, anyres=anyres)
        with torch.no_grad():
            a = model(sample.input_ids[None], sample.pixel_values, sample.image_sizes)
            b = loaded(sample.input_ids[None], sample.pixel_values, sample.image_sizes)
        assert torch.equal(a, b)
    with safe_open(str(out / "latest" / "model.safetensors"), "pt") as f:   # the hub's names, as docs/MODEL.md §2 lists
        keys = set(f.keys())
    assert "image_newline" in keys and "language_model.lm_head.weight" not in keys   # tied, as 0.5B
    assert {"language_model.model.embed_tokens.weight", "multi_modal_projector.linear_1.weight",
            "vision_tower.vision_model.embeddings.patch_embedding.weight",
            "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
            "language_model.model.layers.0.mlp.gate_proj.weight"} <= keys
    assert all(k == "image_newline" or k.startswith(("language_model.model.", "vision_tower.vision_model.",
                                                      "multi_modal_projector.")) for k in keys)
    config = json.loads((out / "latest" / "config.json").read_text())
    generation = json.loads((out / "latest" / "generation_config.json").read_text())
    assert config["image_token_index"] == tokenizer.token_to_id("<image>") < config["text_config"]["vocab_size"]
    assert generation["eos_token_id"] == [tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")]


def test_the_embedded_model_gives_the_reference_implementations_logits():
    """models/m4-tiny, as train.py wrote it, read by interleave.load and by transformers (the golden, made by
    tests/goldens/make_m4tiny_golden.py): the same logits within the parity bound of tests/test_parity.py. In float64
    on both sides: in float32 each is up to 1e-4 away from its own float64 logits at some image slots of this model."""
    golden = load_file(golden_path("m4tiny", "golden.safetensors"))
    model = interleave.load(os.path.join(ROOT, "models", "m4-tiny"), dtype=torch.float64)
    with torch.no_grad():
        logits = model(golden["input_ids"], golden["pixel_values"].double())
    diff, bound = max_diff(logits, golden["logits"])
    assert diff <= bound, (f"max|diff| {diff:.3g} > {bound:.3g}: if models/m4-tiny was retrained, remake the golden "
                           "with tests/goldens/make_m4tiny_golden.py")


def test_resume_reproduces_the_loss_curve(run, data, tmp_path):
    """An interrupted run, as the run fixture left it at its step-6 checkpoint, resumed, gives the same 12 losses."""
    out, result = run
    shutil.copytree(out / "step-000006", tmp_path / "step-000006")
    os.symlink("step-000006", tmp_path / "latest")
    resumed = train.main(args(data, tmp_path, "--steps", 12, "--save-every", 6, "--resume"))
    assert resumed["history"] == result["history"]   # exactly: same data position, optimizer state, schedule


def test_torchrun_two_processes_match_one(run, data, tmp_path):
    """2 gloo processes with 4 records each give the loss of one process with the same 8 records per step.
    Samples never attend to each other, so the two differ only in float rounding (matmul shapes, the order of the
    sums): at most 2e-7 relative over these 12 steps when measured. 1e-5 is far below what a wrong gradient average,
    a lost sample or a wrong learning rate would change (the loss moves by over 5% a step here)."""
    out, result = run
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train.py"), *args(data, tmp_path, "--steps", 12, "--save-every", 12)]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    state = train.read_trainer_state(tmp_path / "latest")
    two = [loss for _, loss in state["progress"][2]]
    one = [loss for _, loss in result["history"]]
    assert two == pytest.approx(one, rel=1e-5)


def test_spawned_loader_processes_match_forked_ones(run, data, tmp_path):
    """macOS and Windows start processes by spawning, which inherits nothing: the loader processes get the run's
    settings passed to them, and a spawned run gives the losses of the forked one (the run fixture, on Linux)."""
    out, result = run
    code = "import multiprocessing, sys, train; multiprocessing.set_start_method('spawn'); train.main(sys.argv[1:])"
    cmd = [sys.executable, "-c", code, *args(data, tmp_path, "--steps", 12, "--save-every", 12)]
    done = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    state = train.read_trainer_state(tmp_path / "latest")
    assert state["progress"][2] == result["history"]


def test_fine_tuning_trains_projector_and_decoder_only(data, tmp_path):
    init = tmp_path / "init"
    shutil.copytree(golden_path("untied", "hf"), init)   # tiny HF-layout checkpoint, untied, no image_newline
    write_tiny_tokenizer(init)
    before = interleave.load(init, dtype=torch.float32)
    result = train.main(["--init", str(init), "--data", str(data / "train.json"), "--out", str(tmp_path / "ft"),
                         "--steps", "2", "--batch", "4", "--lr", "1e-3", "--warmup", "1"])
    after = result["model"].state_dict()
    for name, value in before.state_dict().items():
        assert torch.equal(value, after[name]) == name.startswith("vision."), name
    loaded = interleave.load(tmp_path / "ft" / "latest")
    assert not loaded.config.has_image_newline and torch.equal(loaded.lm_head.weight, after["lm_head.weight"])


def test_malformed_records_are_skipped_and_counted(data, tmp_path, capsys):
    records = json.loads((data / "train.json").read_text())[:6]
    good = next(r for r in records if r["metadata"]["task"] == "multi_image")   # three images, three markers
    missing = dict(good, id="missing", image=["nowhere.png"] * 3)
    mismatch = dict(good, id="mismatch", image=good["image"][:2])
    lines = [json.dumps(r) for r in records + [missing, mismatch]] + ["{not json", "[1, 2]"]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines))
    result = train.main(["--data", str(tmp_path / "bad.jsonl"), "--image-folder", str(data), "--out",
                         str(tmp_path / "out"), "--steps", "3", "--batch", "3", "--warmup", "1"])
    printed = capsys.readouterr().out
    assert result["skipped"] == 4 and len(result["history"]) == 3   # 9 records, 3 steps of 3: each seen once
    assert "is not JSON" in printed and "does not exist" in printed and "markers" in printed


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    train.main(args(data, tmp_path, "--steps", 2, "--save-every", 2))
    good = (tmp_path / "step-000002" / "model.safetensors").read_bytes()
    forward = train.WithLoss.forward
    monkeypatch.setattr(train.WithLoss, "forward", lambda self, *a: forward(self, *a) * float("nan"))
    with pytest.raises(SystemExit) as stop:
        train.main(args(data, tmp_path, "--steps", 4, "--save-every", 1, "--resume"))
    assert "stopping" in str(stop.value.code) and "step-000002" in str(stop.value.code)
    assert os.readlink(tmp_path / "latest") == "step-000002"
    assert not [name for name in os.listdir(tmp_path) if name.startswith(("step-000003", ".step"))]
    assert (tmp_path / "step-000002" / "model.safetensors").read_bytes() == good
    interleave.load(tmp_path / "latest")


def test_every_step_of_a_short_run_uses_the_learning_rate_computed_by_hand(data, tmp_path, monkeypatch):
    """The rate each optimizer step really took (issue 21): warmup 1/2 and 2/2 of --lr, then the cosine
    0.1 + 0.45 (1 + cos(pi p)) of it at p = 0, 1/3, 2/3 (cos(pi/3) = 0.5). Both parameter groups alike."""
    rates = []
    make_optimizer = train.make_optimizer

    def recording_optimizer(params, cfg, cuda):
        optimizer = make_optimizer(params, cfg, cuda)
        step = optimizer.step

        def recording_step(*args, **kwargs):
            rates.append([group["lr"] for group in optimizer.param_groups])
            return step(*args, **kwargs)
        optimizer.step = recording_step
        return optimizer
    monkeypatch.setattr(train, "make_optimizer", recording_optimizer)
    train.main(["--init", "tiny", "--data", str(data / "train.json"), "--out", str(tmp_path / "run"), "--steps", "5",
                "--batch", "2", "--lr", "1e-3", "--warmup", "2", "--eval-every", "0", "--save-every", "0"])
    by_hand = [0.5e-3, 1e-3, 1e-3, 0.775e-3, 0.325e-3]
    assert [group for group, _ in rates] == pytest.approx(by_hand, rel=1e-9)
    assert all(a == b for a, b in rates)
