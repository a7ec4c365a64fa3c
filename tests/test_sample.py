"""sample.py, the program people run: run as a subprocess on tiny checkpoints of every layout, each scenario, the
streamed answer against the non-streamed one, chat, --viz and every kind of bad input (one line, exit status 2)."""
import io
import json
import os
import pty
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import interleave
import sample
from helpers import golden_path, write_tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLING = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05}


def cli(*args, input=None, stdin=None):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *map(str, args)], input=input,
                          stdin=stdin if stdin is not None or input is not None else subprocess.DEVNULL,
                          capture_output=True, encoding="utf-8", timeout=300, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Tiny random checkpoints with a tokenizer: hub HF layout, transformers-5 layout (sharded, with a sampling
    generation_config.json), original layout, original with multi-patch, and one with a 100-token context."""
    base, folders = tmp_path_factory.mktemp("ckpt"), {}
    for name, source in (("hf", ("tied", "hf")), ("sharded", ("untied", "hf_new")),
                         ("original", ("untied", "original")), ("anyres", ("anyres", "original")),
                         ("short", ("tied", "hf"))):
        folders[name] = str(shutil.copytree(golden_path(*source), base / name))
        write_tiny_tokenizer(folders[name])
    with open(os.path.join(folders["sharded"], "generation_config.json"), "w") as f:
        json.dump(SAMPLING, f)
    config = json.load(open(os.path.join(folders["short"], "config.json")))
    config["text_config"]["max_position_embeddings"] = 100
    json.dump(config, open(os.path.join(folders["short"], "config.json"), "w"))
    return folders


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base, rng = tmp_path_factory.mktemp("inputs"), np.random.default_rng(0)
    noise = lambda w, h: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    paths = {}
    for name, (w, h) in (("a", (50, 40)), ("b", (30, 60)), ("v1", (40, 40)), ("v2", (40, 40)), ("v3", (40, 40)),
                         ("big", (300, 200))):
        paths[name] = str(base / f"{name}.png")
        noise(w, h).save(paths[name])
    frames = [noise(32, 32) for _ in range(6)]
    paths["gif"] = str(base / "clip.gif")
    frames[0].save(paths["gif"], save_all=True, append_images=frames[1:])
    paths["bad"] = str(base / "bad.png")
    open(paths["bad"], "w").write("not an image")
    return paths


def reference(folder, question, images, max_new_tokens, anyres=False, seed=None, **sampling):
    """The answer computed here without streaming, from the same inputs."""
    model, tok = interleave.load(folder, dtype=torch.float32), interleave.load_tokenizer(folder)
    s = interleave.build_inputs([("user", question, [interleave.open_image(i) for i in images])], tok, model.config,
                                anyres=anyres)
    stops = [tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")]
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    new = model.generate(s.input_ids[None], s.pixel_values, s.image_sizes, max_new_tokens=max_new_tokens,
                         stop_ids=stops, generator=generator, **sampling)[0].tolist()
    new = new[:[t in stops for t in new].index(True)] if any(t in stops for t in new) else new
    return tok.decode(new, skip_special_tokens=True)


def assert_one_line_error(result, *words):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: ") and all(word in result.stderr for word in words), result.stderr


def test_no_arguments_runs_the_demo_on_the_embedded_model_in_seconds():
    files = sorted(os.listdir(sample.EMBEDDED))
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(files), files
    assert sum(os.path.getsize(os.path.join(sample.EMBEDDED, f)) for f in files) <= 10_000_000   # at most 10 MB
    start = time.time()
    result = cli()
    assert result.returncode == 0, result.stderr
    for task in ("multi_image", "video", "multi_view", "multi_patch"):
        assert f"[{task}, expected answer: " in result.stdout
    assert result.stdout.count("\n> ") == 4 and result.stderr.count("time to first token") == 4
    assert time.time() - start < 60


def test_demo_on_the_original_layout_with_viz_and_on_hf_without_multipatch(ckpt, tmp_path):
    result = cli("--demo", "--model", ckpt["anyres"], "--max-new-tokens", 4, "--viz", tmp_path / "att.png")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n> ") == 4
    tasks = ("multi_image", "multi_patch", "multi_view", "video")
    assert sorted(os.listdir(tmp_path)) == [f"att-{task}.png" for task in tasks]   # one picture per scenario
    result = cli("--demo", "--model", ckpt["hf"], "--max-new-tokens", 4, "--quiet")
    assert result.returncode == 0 and result.stdout.count("\n> ") == 3 and "[multi_patch" not in result.stdout


def test_multi_image_streams_exactly_the_greedy_answer_and_reports_on_stderr(ckpt, files):
    question = "Compare <image> and <image>, what changed?"
    result = cli("--model", ckpt["hf"], "--image", files["a"], "--image", files["b"], question, "--max-new-tokens", 24)
    assert result.returncode == 0, result.stderr
    assert result.stdout == reference(ckpt["hf"], question, [files["a"], files["b"]], 24) + "\n"
    for line in ("image slots: a.png 64, b.png 64", "time to first token", "tokens/s", "peak RSS"):
        assert line in result.stderr


def test_video_uses_the_generation_config_and_the_seed(ckpt, files):
    result = cli("--model", ckpt["sharded"], "--video", files["gif"], "--num-frames", 4, "--seed", 7, "What happens?",
                 "--max-new-tokens", 16)
    assert result.returncode == 0, result.stderr
    assert "defaults from generation_config.json: repetition_penalty 1.05, temperature 0.7, top_k 20, top_p 0.8" \
        in result.stderr and "4 images x 64" in result.stderr
    frames = interleave.read_video_frames(files["gif"], 4)
    expected = reference(ckpt["sharded"], "What happens?", frames, 16, seed=7,
                         **{k: v for k, v in SAMPLING.items() if k != "do_sample"})
    assert result.stdout == expected + "\n"


def test_views_with_the_prompt_after_them_and_quiet(ckpt, files):
    views = [files["v1"], files["v2"], files["v3"]]
    result = cli("--model", ckpt["original"], "--views", *views, "How many chairs are in the room?", "--quiet",
                 "--max-new-tokens", 12)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout == reference(ckpt["original"], "How many chairs are in the room?", views, 12) + "\n"


def test_multipatch_with_the_prompt_on_stdin_and_an_attention_map(ckpt, files, tmp_path):
    out = tmp_path / "where.png"
    result = cli("--model", ckpt["anyres"], "--image", files["big"], "--anyres", "--viz", out, "--max-new-tokens", 12,
                 input="What is the mark?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == reference(ckpt["anyres"], "What is the mark?", [files["big"]], 12, anyres=True) + "\n"
    # One 256-pixel square wide; taller than it by the caption, the label and the colour scale (issue 15)
    width, height = Image.open(out).size
    assert "attention map in" in result.stderr and width == 256 and height > 256


def test_chat_keeps_the_images_in_the_conversation(ckpt, files):
    master, terminal = pty.openpty()   # the chat starts only when stdin is a terminal
    os.write(master, b"Compare <image> and <image>\nAnd which is brighter?\n\n")
    try:
        result = cli("--model", ckpt["hf"], "--image", files["a"], "--image", files["b"], "--max-new-tokens", 8,
                     stdin=terminal)
    finally:
        os.close(terminal), os.close(master)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("you: ") == 3 and result.stdout.count("model: ") == 2
    first, second = [line for line in result.stderr.splitlines() if "prompt tokens" in line]
    assert "a.png 64, b.png 64" in first and "a.png 64, b.png 64" in second
    assert int(second.split()[0]) > int(first.split()[0])
    answer = reference(ckpt["hf"], "Compare <image> and <image>", [files["a"], files["b"]], 8)
    assert result.stdout.startswith(f"you: model: {answer}\nyou: model: ")


@pytest.mark.parametrize("case", ["missing image", "unreadable image", "missing video", "marker count",
                                  "context", "missing model", "multipatch on hf", "no prompt"])
def test_bad_input_gives_one_line_and_exit_status_2(case, ckpt, files):
    a, hf = files["a"], ckpt["hf"]
    args, words = {
        "missing image": (["--model", hf, "--image", "nope.png", "q"], ["nope.png does not exist"]),
        "unreadable image": (["--model", hf, "--image", files["bad"], "q"], ["cannot read", "bad.png"]),
        "missing video": (["--model", hf, "--video", "nope.gif", "q"], ["nope.gif does not exist"]),
        "marker count": (["--model", hf, "--image", a, "Compare <image> and <image>"], ["2 <image> markers but 1"]),
        "context": (["--model", ckpt["short"], "--image", a, "--image", a, "q"], ["more than the model's context"]),
        "missing model": (["--model", "/no/such/folder", "q"], ["/no/such/folder does not exist"]),
        "multipatch on hf": (["--model", hf, "--image", a, "--anyres", "q"], ["image_newline"]),
        "no prompt": (["--model", hf, "--image", a], ["no prompt"]),
    }[case]
    assert_one_line_error(cli(*args, "--quiet"), *words)   # --quiet: only the error, no statistics


def test_streaming_holds_back_a_character_split_across_tokens(ckpt):
    tok = interleave.load_tokenizer(ckpt["hf"])
    ids = tok.encode("é€!", add_special_tokens=False).ids     # ASCII-trained BPE: one token per byte of é and €
    assert len(ids) == 6
    out = io.StringIO()
    stream, shown = sample.Stream(tok, [tok.token_to_id("<|im_end|>")], out), []
    for token in ids + [tok.token_to_id("<|im_end|>"), 7]:    # nothing after the stop id is shown
        stream(torch.tensor([token]))
        shown.append(out.getvalue())
    assert shown == ["", "é", "é", "é", "é€", "é€!", "é€!", "é€!"]
    assert stream.flush() == "é€!" and out.getvalue() == "é€!\n"


def test_attention_recording_leaves_the_answer_alone_and_restores_the_model(ckpt):
    model, inner = interleave.load(ckpt["hf"]), interleave.attention
    ids = torch.randint(0, 290, (1, 20))
    plain = model.generate(ids, max_new_tokens=6, stop_ids=[])
    with sample.recording_attention(20) as record:
        recorded = model.generate(ids, max_new_tokens=6, stop_ids=[])
    assert torch.equal(plain, recorded) and interleave.attention is inner
    assert record[1] == 5 * model.config.text.layers                 # every decoding step in every layer
    assert 0 < float(record[0].sum()) / record[1] <= 1 + 1e-5          # a share of each step's attention


def test_command_line_options_win_over_generation_config(ckpt):
    args = sample.parse_args(["--temperature", "0", "--max-new-tokens", "5"])
    settings, stops = sample.generation_settings(args, ckpt["sharded"], lambda message: None)
    assert settings == dict(temperature=0.0, top_k=20, top_p=0.8, repetition_penalty=1.05, max_new_tokens=5)


def test_viz_draws_the_hot_patch_red_on_an_enlarged_image_with_caption_and_scale(tmp_path):
    config = interleave.read_config(os.path.join(ROOT, "models", "m4-tiny"))   # 64-pixel images, 4 x 4 patches
    slot = config.image_token_id
    sample_in = interleave.Sample(torch.tensor([5] + [slot] * 16 + [6]), None, None, [None])
    weights = torch.full((18,), 0.01)
    weights[1 + 1 * 4 + 2] = 0.5                     # row 1, column 2 of the patch grid
    # A 64-pixel checkerboard of 1-pixel squares: enlarged by nearest neighbour, each becomes a 4 x 4 block.
    board = Image.fromarray(((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)).convert("RGB")
    out = str(tmp_path / "viz.png")
    caption = ["question: which?", "answer: 3", "expected answer: 3"]
    sample.draw_attention(out, [board], ["board"], sample_in, weights, config, lambda message: None, caption)
    sheet = np.asarray(Image.open(out).convert("RGB")).astype(int)
    header = 14 * len(caption) + 8
    # The hot patch (64 x 64 pixels on the sheet) is red; a cold one is grey (no red cast).
    hot = sheet[header + 64 + 32, 128 + 32 + 1]
    cold = sheet[header + 192 + 32, 32 + 1]
    assert hot[0] >= 190 and hot[1] < 100, hot
    assert abs(cold[0] - cold[1]) < 10, cold
    # Nearest neighbour: the cold patch keeps the board's sharp 4-pixel blocks (a blur would give mid-grey).
    row = sheet[header + 192 + 33, 0:64, 1]
    assert set(np.unique(row)) <= {0, 255} and len(np.unique(row)) == 2
    # Caption above the images, the name below them, a colour scale at the bottom running grey to red.
    assert (sheet[:header] < 128).any()
    assert (sheet[header + 256: header + 256 + 14] < 128).any()
    scale = sheet[header + 256 + 22 + 4 + 5, 8:248]
    assert scale[0][0] - scale[0][1] < 10 and scale[-1][0] - scale[-1][1] > 150
