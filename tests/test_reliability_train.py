"""train.py as an attacker and a careless user would run it (issue 16): no pickle is ever read back, a used run folder
is refused and the rotation deletes only the run's own older checkpoints, the model is saved before the final
evaluation, every malformed record or file is skipped and counted once or refused in one line, nonsense options are
refused before anything is built, and the loader processes die with the trainer."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from data import make_m4
from interleave import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m4")
    make_m4.main(["--out", str(folder), "--train", "2", "--val", "1", "--seed", "0"])   # 8 training records
    return folder


def tiny(data, out, *extra):
    """train.py's arguments for a tiny run of 2 steps of 4 records, no evaluation but the final one."""
    return ["--init", "tiny", "--data", str(data / "train.json"), "--val", str(data / "val.json"), "--out", str(out),
            "--image-folder", str(data), "--steps", "2", "--batch", "4", "--warmup", "1", "--eval-every", "0",
            "--save-every", "0", *map(str, extra)]


def records_of(data, split="train.json"):
    return json.loads((data / split).read_text())


def write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def one_line(stop):
    """The message of a SystemExit, checked to be one line."""
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


# ---- 1: the trainer state is never unpickled

class Payload:
    """A pickle that creates a file when it is loaded: what a shared run folder could hold."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_resume_never_unpickles_a_trainer_state(data, tmp_path):
    out = tmp_path / "run"
    train.main(tiny(data, out, "--save-every", 2))
    marker = tmp_path / "payload-ran"
    torch.save({"progress": Payload(str(marker))}, out / "latest" / "trainer_state.pt")
    try:
        resumed = train.main(tiny(data, out, "--steps", 3, "--save-every", 3, "--resume"))
    finally:
        assert not marker.exists(), "--resume unpickled trainer_state.pt"
    assert [step for step, _ in resumed["history"]] == [1, 2, 3]
    assert sorted(os.listdir(out / "latest")) == sorted(   # the state is JSON and safetensors
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "trainer_state.json",
         "trainer_state.safetensors"])


def test_a_malformed_trainer_state_is_one_line(data, tmp_path):
    out = tmp_path / "run"
    train.main(tiny(data, out, "--save-every", 2))
    (out / "latest" / "trainer_state.json").write_text('{"step": "two"}')
    with pytest.raises(SystemExit) as stop:
        train.main(tiny(data, out, "--steps", 3, "--resume"))
    assert "trainer state" in one_line(stop)


# ---- 4: nothing the run wrote is deleted, `latest` never points at a missing folder

def test_a_fresh_run_into_a_folder_with_checkpoints_is_refused(data, tmp_path):
    out = tmp_path / "run"
    for step in (100, 200):   # a later run's checkpoints
        (out / f"step-{step:06d}").mkdir(parents=True)
        (out / f"step-{step:06d}" / "model.safetensors").write_text("kept")
    os.symlink("step-000200", out / "latest")
    before = sorted(os.listdir(out))
    with pytest.raises(SystemExit) as stop:
        train.main(tiny(data, out, "--save-every", 1))
    message = one_line(stop)
    assert str(out) in message and "--resume" in message and "another --out" in message
    assert sorted(os.listdir(out)) == before and os.readlink(out / "latest") == "step-000200"


def test_the_rotation_deletes_only_the_runs_own_older_checkpoints(tmp_path):
    tokenizer = train.train_tokenizer([])
    model = train.fresh_model("tiny", tokenizer, 0)
    for step in (100, 200):   # not this run's: higher steps
        (tmp_path / f"step-{step:06d}").mkdir()
    for step in (1, 2, 3):
        train.save_checkpoint(str(tmp_path), step, model, tokenizer, None)
        assert os.readlink(tmp_path / "latest") == f"step-{step:06d}"
        assert (tmp_path / "latest" / "model.safetensors").exists()
    kept = sorted(name for name in os.listdir(tmp_path) if name.startswith("step-"))
    assert kept == ["step-000002", "step-000003", "step-000100", "step-000200"]


# ---- 5: the model is saved before the final evaluation, which survives odd records

def test_the_export_is_written_before_the_final_evaluation(data, tmp_path, monkeypatch):
    export = tmp_path / "export"

    def failing_evaluation(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(train, "evaluate", failing_evaluation)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        train.main(tiny(data, tmp_path / "run", "--export", export))
    assert (export / "model.safetensors").exists() and (export / "tokenizer.json").exists()


def test_odd_metadata_in_held_out_records_counts_under_all(data, tmp_path):
    good = records_of(data, "val.json")[:2]
    odd = [dict(good[0], id="text", metadata="multi_image"), dict(good[0], id="list", metadata=["task"]),
           dict(good[1], id="number", metadata={"task": 5}), dict(good[1], id="unhashable", metadata={"task": ["x"]})]
    long = {"id": "long", "conversations": [{"from": "human", "value": "word " * 5000}, {"from": "gpt", "value": "a"}]}
    unusable = [{"id": "no turns", "conversations": []}, long]   # the tiny model has 4096 positions
    val = write_lines(tmp_path / "val.jsonl", good + odd + unusable)
    result = train.main(tiny(data, tmp_path / "run", "--val", val, "--export", tmp_path / "export"))
    final = result["evals"][-1]
    tasks = {r["metadata"]["task"] for r in good}
    assert set(final["accuracy"]) == tasks | {"all"} and final["records"] == 8
    assert result["skipped"] == 2


# ---- 6: malformed records and files: skipped and counted once, or refused in one line

def test_records_whose_conversations_are_not_turns_are_skipped_and_counted(data, tmp_path):
    good = records_of(data)[:4]
    surrogate = [{"from": "human", "value": "\ud800"}, {"from": "gpt", "value": "a"}]   # a lone one: no UTF-8
    bad = [dict(good[0], id="empty", conversations=[]), dict(good[0], id="five", conversations=5),
           dict(good[0], id="strings", conversations=["hello"]), dict(good[0], id="surrogate", conversations=surrogate)]
    path = write_lines(tmp_path / "bad.jsonl", good + bad + [5, "text", None])
    result = train.main(tiny(data, tmp_path / "run", "--data", path, "--batch", 8))
    assert result["skipped"] == 7 and len(result["history"]) == 2   # each drawn twice, counted once


@pytest.mark.parametrize("text", ["indented", "5\n", "{\n  \"id\": 1\n}\n"])
def test_a_file_that_holds_no_list_of_records_is_one_line(data, tmp_path, text):
    if text == "indented":
        text = json.dumps(records_of(data)[0], indent=2)   # one record, not in a list
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(SystemExit) as stop:
        train.main(tiny(data, tmp_path / "run", "--data", tmp_path / "bad.json"))
    assert "expected a JSON list of records" in one_line(stop)


def test_a_one_line_json_lines_file_is_one_record(data, tmp_path):
    record = records_of(data)[0]
    path = write_lines(tmp_path / "one.jsonl", [record])
    skipped = []
    assert train.read_records(path, lambda why, key: skipped.append(why)) == [record] and not skipped


def test_a_line_that_is_not_utf8_is_skipped_with_its_number(data, tmp_path):
    first, second = records_of(data)[:2]
    lines = [json.dumps(first).encode(), b'{"id": "\xff\xfe"}', json.dumps(second).encode()]
    (tmp_path / "mixed.jsonl").write_bytes(b"\n".join(lines))
    skipped = []
    records = train.read_records(tmp_path / "mixed.jsonl", lambda why, key: skipped.append(why))
    assert records == [first, second]
    assert len(skipped) == 1 and "line 2 is not UTF-8" in skipped[0]


def test_a_json_list_with_a_syntax_error_names_its_line_and_column(data, tmp_path):
    text = json.dumps(records_of(data)[:3], indent=2)
    broken = text.replace('},\n  {', '}\n  {', 1)   # a missing comma between two records
    with pytest.raises(json.JSONDecodeError) as error:
        json.loads(broken)
    (tmp_path / "broken.json").write_text(broken)
    with pytest.raises(SystemExit) as stop:
        train.main(tiny(data, tmp_path / "run", "--data", tmp_path / "broken.json"))
    assert f"line {error.value.lineno} column {error.value.colno}" in one_line(stop)


def test_resume_with_no_checkpoint_is_one_line(data, tmp_path):
    with pytest.raises(SystemExit) as stop:
        train.main(tiny(data, tmp_path / "run", "--resume"))
    message = one_line(stop)
    assert os.path.join(str(tmp_path / "run"), "latest") in message and "without --resume" in message


def mutated(source, rng):
    """`source` (bytes) with 1 to 4 random edits: a byte flipped, a span cut or doubled, JSON's own characters or
    bytes that are not UTF-8 inserted, the end cut off."""
    text = bytearray(source)
    pieces = [b"[", b"]", b"{", b"}", b",", b'"', b"\n", b"\xff", b"\x00", b"5", b"null", b"\\ud800", b"[" * 3000]
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(text) or 1)
        span = rng.randint(1, 40)
        edit = rng.choice(["flip", "cut", "double", "insert", "end"])
        if edit == "flip" and text:
            text[at] ^= 1 << rng.randrange(8)
        elif edit == "cut":
            del text[at:at + span]
        elif edit == "double":
            text[at:at] = text[at:at + span]
        elif edit == "insert":
            text[at:at] = rng.choice(pieces)
        else:
            del text[at:]
    return bytes(text)


def test_random_mutations_of_a_records_file_give_records_or_one_input_error(data, tmp_path):
    """A seeded fuzz of read_records and train_tokenizer, the parsers before record_to_sample: 300 mutations of a
    JSON list and of JSON Lines each give a list of objects, which train_tokenizer takes, or one InputError line."""
    rng = random.Random(0)
    records = records_of(data)[:3]
    sources = [json.dumps(records, indent=2).encode(), b"".join(json.dumps(r).encode() + b"\n" for r in records)]
    refused = 0
    for trial in range(300):
        path = tmp_path / f"{trial}.json"
        path.write_bytes(mutated(sources[trial % 2], rng))
        try:
            got = train.read_records(path, lambda why, key: None)
        except InputError as e:
            assert "\n" not in str(e), (path.read_bytes(), e)
            refused += 1
            continue
        assert all(isinstance(record, dict) for record in got), path.read_bytes()
        train.train_tokenizer(got, vocab_size=300)
    assert 0 < refused < 300   # both outcomes were met


@pytest.mark.parametrize("option, value", [
    ("--steps", 0), ("--batch", 0), ("--budget", 0), ("--lr", 0), ("--lr", "nan"), ("--lr", "inf"),
    ("--warmup", -1), ("--eval-every", -1), ("--save-every", -1), ("--pretrain-tower", -1), ("--synthetic", -1),
    ("--seed", -1), ("--seed", 2**70), ("--attn", "fast"), ("--init", "nowhere")])
def test_nonsense_options_are_refused_before_anything_is_built(data, tmp_path, option, value):
    with pytest.raises(SystemExit) as stop:
        train.main(tiny(data, tmp_path / "run", option, value))
    assert option in one_line(stop)
    assert not (tmp_path / "run").exists()


def test_the_skip_count_counts_records_not_draws(data, tmp_path):
    good = records_of(data)[:2]
    missing = dict(good[0], id="missing", image=["nowhere.png"] * len(good[0]["image"]))
    path = write_lines(tmp_path / "three.jsonl", good + [missing])
    result = train.main(tiny(data, tmp_path / "run", "--data", path, "--batch", 3, "--steps", 3))
    assert result["skipped"] == 1   # drawn three times, once an epoch


@pytest.mark.parametrize("budget, says", [(16, "the chat template alone"), (30, "raise --budget 30")])
def test_a_budget_no_record_fits_stops_in_one_line(data, tmp_path, budget, says):
    with pytest.raises(SystemExit) as stop:
        train.main(tiny(data, tmp_path / "run", "--budget", budget, "--steps", 20))
    assert says in str(stop.value.code) and "\n" not in str(stop.value.code)


# ---- 9: the loader processes exit when the trainer dies

def descendants(pid):
    """The ids of the live processes started by `pid`, its children's children too (a fork server's loaders)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and alive(int(entry)):
            parents[int(entry)] = parent_of(int(entry))
    found = [child for child, parent in parents.items() if parent == pid]
    for child in found:
        found += [grandchild for grandchild, parent in parents.items() if parent == child]
    return found


def stat_fields(pid):
    """The fields of /proc/PID/stat after the command name: state, parent id, ...; None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def parent_of(pid):
    fields = stat_fields(pid)
    return int(fields[1]) if fields else None


def alive(pid):
    """Whether the process runs: not gone and not a zombie (an orphan's zombie may wait for a reaper)."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_loader_processes_exit_when_the_trainer_is_killed(data, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *tiny(data, tmp_path / "run", "--steps", 100000)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    trainer = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    loaders = []
    try:
        expected = min(8, os.cpu_count())
        deadline = time.time() + 120
        while len(loaders) < expected and time.time() < deadline and trainer.poll() is None:
            time.sleep(0.2)
            loaders = descendants(trainer.pid)
        assert len(loaders) >= expected, "the loader processes never started"
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        deadline = time.time() + 10
        while any(map(alive, loaders)) and time.time() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in loaders if alive(pid)]
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
        for pid in loaders:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
