"""train.py --fsdp on CPU (gloo, 2 processes, the tiny preset): FSDP2's losses equal one process's, its export gives
the unsharded model's logits, and resuming from its sharded checkpoint is bit-exact."""
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import interleave
import train
from data import make_m4

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10
BATCH = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """16 synthetic records with images and 16 text-only copies of them (the images and their markers removed)."""
    folder = tmp_path_factory.mktemp("m4")
    make_m4.main(["--out", str(folder), "--train", "4", "--val", "1", "--seed", "0"])
    records = json.loads((folder / "train.json").read_text())
    text = [{"id": "text-" + r["id"], "metadata": r["metadata"],
             "conversations": [dict(turn, value=turn["value"].replace("<image>", "")) for turn in r["conversations"]]}
            for r in records]
    (folder / "mixed.json").write_text(json.dumps(records + text))
    return folder


def args(data, out, *extra):
    """Seed 5 and --budget 150 make the steps this test needs (test_the_data_order_makes_fsdp_work_hard checks)."""
    return ["--init", "tiny", "--data", str(data / "mixed.json"), "--image-folder", str(data), "--val",
            str(data / "val.json"), "--out", str(out), "--batch", str(BATCH), "--budget", "150", "--seed", "5",
            "--lr", "3e-3", "--warmup", "2", "--eval-every", "0", "--steps", str(STEPS), *map(str, extra)]


def torchrun(*argv):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train.py"), *argv]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def losses(folder):
    return [loss for _, loss in train.read_trainer_state(folder / "latest")["progress"][2]]


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """One process without FSDP; 2 FSDP processes for 10 steps, checkpoints at 5 and 10; the same resumed at 5."""
    one = tmp_path_factory.mktemp("one")
    train.main(args(data, one, "--save-every", STEPS, "--export", one / "export"))
    fsdp = tmp_path_factory.mktemp("fsdp")
    torchrun(*args(data, fsdp, "--fsdp", "--save-every", 5, "--export", fsdp / "export"))
    resumed = tmp_path_factory.mktemp("resumed")
    shutil.copytree(fsdp / "step-000005", resumed / "step-000005")
    os.symlink("step-000005", resumed / "latest")
    torchrun(*args(data, resumed, "--fsdp", "--save-every", 5, "--resume", "--export", resumed / "export"))
    return one, fsdp, resumed


def test_the_data_order_makes_fsdp_work_hard(data):
    """What FSDP must handle, in these 10 steps (the data order is train.py's: records at position + rank): a step
    with no image on either process, one without a multi-patch image, and one where a process has two packs (two
    samples with images: over 150 tokens) and the other one (two text-only samples: under 150)."""
    records = json.loads((data / "mixed.json").read_text())
    no_image = no_multipatch = uneven = 0
    for step in range(STEPS):
        drawn = []
        for i in range(step * BATCH, (step + 1) * BATCH):
            drawn.append(records[train.permutation(len(records), 5, i // len(records))[i % len(records)]])
        images = ["image" in r or "video" in r for r in drawn]
        no_image += not any(images)
        no_multipatch += not any(r["metadata"]["task"] == "multi_patch" and images[k] for k, r in enumerate(drawn))
        uneven += images[0::2] in ([True, True], [False, False]) and images[1::2] == [not images[0]] * 2
    assert no_image and no_multipatch and uneven, (no_image, no_multipatch, uneven)


def test_fsdp_losses_equal_one_process(runs):
    """Two processes sum their shares of the gradient in another order than one process (and each pack's gradient
    is reduce-scattered, in fp32), so the losses may differ in float rounding only: 1.4e-7 relative at most when
    measured over these 10 steps. 1e-5 is far below what a lost sample, a gradient counted twice or a weight
    updated without a gradient would change (the loss moves by 5-20% a step here)."""
    one, fsdp, _ = runs
    assert len(losses(one)) == STEPS
    assert losses(fsdp) == pytest.approx(losses(one), rel=1e-5)


def test_fsdp_export_gives_the_unsharded_models_logits(runs, data):
    """The export, gathered from the shards on rank 0, loaded by interleave.load: the logits of the one-process
    run's export, on a held-out record of each task (multi-patch needs image_newline). The weights differ by float
    rounding only (max |logit diff| 2.4e-6 when measured, of logits up to 4.8); 1e-5 of the largest logit."""
    one, fsdp, _ = runs
    ours = interleave.load(fsdp / "export")
    reference = interleave.load(one / "export")
    tokenizer = interleave.load_tokenizer(fsdp / "export")
    for record in json.loads((data / "val.json").read_text()):
        anyres = record["metadata"]["task"] == "multi_patch"
        sample = interleave.record_to_sample(record, str(data), tokenizer, ours.config, anyres=anyres)
        with torch.no_grad():
            a = ours(sample.input_ids[None], sample.pixel_values, sample.image_sizes)
            b = reference(sample.input_ids[None], sample.pixel_values, sample.image_sizes)
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), record["metadata"]["task"]


def test_fsdp_resume_is_bit_exact(runs):
    """10 steps straight, or 5 and then 5 more resumed from the sharded checkpoint: the same losses and the same
    exported weights, bit for bit; the checkpoint holds the shards and JSON, no model.safetensors."""
    _, fsdp, resumed = runs
    assert sorted(os.listdir(fsdp / "step-000005")) == ["config.json", "generation_config.json", "shards",
                                                        "tokenizer.json", "trainer_state.json",
                                                        "trainer_state.safetensors"]
    assert losses(resumed) == losses(fsdp)
    straight = load_file(fsdp / "export" / "model.safetensors")
    again = load_file(resumed / "export" / "model.safetensors")
    assert straight.keys() == again.keys()
    for name, value in straight.items():
        assert torch.equal(value, again[name]), name


def test_an_fsdp_checkpoint_resumes_on_another_process_count(runs, data, tmp_path):
    """The 2 processes' step-5 checkpoint resumed on one (torch.distributed.checkpoint re-cuts the shards): the
    losses of the run that went on with 2, to float rounding (see test_fsdp_losses_equal_one_process)."""
    _, fsdp, _ = runs
    shutil.copytree(fsdp / "step-000005", tmp_path / "step-000005")
    os.symlink("step-000005", tmp_path / "latest")
    result = train.main(args(data, tmp_path, "--fsdp", "--save-every", 5, "--resume"))
    assert [loss for _, loss in result["history"]] == pytest.approx(losses(fsdp), rel=1e-5)


class Runs:
    """A pickled object that would run a command when unpickled."""

    def __reduce__(self):
        return os.system, ("echo pwned",)


def test_a_sharded_checkpoint_is_read_safely_and_only_with_fsdp(runs, data, tmp_path):
    """Resuming reads shards/.metadata (a pickle) with an unpickler that builds only what DCP writes there; a
    checkpoint and --fsdp that disagree are refused before anything is built; a damaged shard is named."""
    one, fsdp, _ = runs
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / ".metadata").write_bytes(pickle.dumps(Runs()))
    with pytest.raises(interleave.CheckpointError, match="system is not in a checkpoint's table of contents"):
        train.ShardReader(str(tmp_path / "shards")).read_metadata()
    assert train.ShardReader(str(fsdp / "latest" / "shards")).read_metadata().state_dict_metadata
    with pytest.raises(SystemExit, match="was written with --fsdp .*: resume with --fsdp"):
        train.main(["--synthetic", "4", "--out", str(fsdp), "--resume"])
    with pytest.raises(SystemExit, match="was written without --fsdp"):
        train.main(["--synthetic", "4", "--out", str(one), "--resume", "--fsdp"])
    cut = tmp_path / "cut"
    shutil.copytree(fsdp / "step-000005", cut / "step-000005")
    os.symlink("step-000005", cut / "latest")
    shard = next((cut / "step-000005" / "shards").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])   # a shard cut short
    with pytest.raises(SystemExit, match="the shards in .* cannot be read"):
        train.main(args(data, cut, "--fsdp", "--resume"))
