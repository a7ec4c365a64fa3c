"""Issue 16, item 8 (sample.py): options out of range or of the wrong kind, prompts that are not UTF-8, a
generation_config.json of the wrong types and --viz without images are each refused in one line naming the
option or field, its value and the fix (exit status 2), before the model loads; a chat refuses a bad line and goes
on; `python sample.py --viz out.png` runs the demo and draws its pictures."""
import json
import os
import pty
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import interleave
import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, input=None, stdin=subprocess.DEVNULL):
    """sample.py in a subprocess, its stdin bytes or a file descriptor; output decoded as UTF-8."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    command = [sys.executable, os.path.join(ROOT, "sample.py"), *args]
    if input is not None:
        stdin = None
    result = subprocess.run(command, input=input, stdin=stdin, capture_output=True, timeout=300, cwd=ROOT,
                            env=env)
    result.stdout = result.stdout.decode("utf-8", "replace")
    result.stderr = result.stderr.decode("utf-8", "replace")
    return result


def one_line_error(result, *words):
    """Assert a subprocess refused its input in one line on stderr with exit status 2, holding every word."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


@pytest.fixture
def refused(monkeypatch, capsys):
    """refused(*argv, words...): sample.main(argv) must give one line holding the words, exit status 2, and
    never load a model (the checks come first)."""
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(interleave, "load", no_load)

    def check(argv, *words):
        """Run main(argv); assert the one line and return it."""
        status = sample.main(["--quiet", *argv])
        err = capsys.readouterr().err
        assert status == 2, err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        for word in words:
            assert word in err, (word, err)
        return err
    return check


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("inputs") / "a.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
    return str(path)


# ---- options by type and range, before the model loads

@pytest.mark.parametrize("option, value, shown, must", [
    ("--temperature", "nan", "nan", "finite number >= 0"),
    ("--temperature", "inf", "inf", "finite number >= 0"),
    ("--temperature", "-1", "-1.0", "finite number >= 0"),
    ("--top-p", "0", "0.0", "above 0 and at most 1"),
    ("--top-p", "2", "2.0", "above 0 and at most 1"),
    ("--top-p", "nan", "nan", "above 0 and at most 1"),
    ("--top-k", "-5", "-5", "whole number >= 0"),
    ("--repetition-penalty", "0", "0.0", "finite number above 0"),
    ("--repetition-penalty", "-1.5", "-1.5", "finite number above 0"),
    ("--repetition-penalty", "nan", "nan", "finite number above 0"),
    ("--seed", str(2 ** 70), str(2 ** 70), "0 to 2**63 - 1"),
    ("--seed", "-1", "-1", "0 to 2**63 - 1"),
    ("--max-new-tokens", "0", "0", "whole number >= 1"),
    ("--num-frames", "0", "0", "whole number >= 1"),
    ("--num-frames", "-5", "-5", "whole number >= 1"),
])
def test_an_option_out_of_range_is_refused_in_one_line_before_the_model_loads(refused, option, value, shown, must):
    refused([option, value, "q"], f"{option} {shown} is out of range", must)


@pytest.mark.parametrize("value", ["foo", "gpu", "cuda:x", "cuda:-1", "cpu:zero"])
def test_a_device_that_is_not_one_is_refused_with_the_names_to_use(refused, value):
    refused(["--device", value, "q"], f"--device {value} is not a device", "cpu, cuda, cuda:N or mps")


def test_the_options_are_checked_before_the_images_are_read(refused):
    # A bad option costs nothing: not even the (missing) image is opened first
    refused(["--image", "nope.png", "--top-k", "-1", "q"], "--top-k -1")


# ---- --viz: needs an image, a picture Pillow can write, a folder that exists

def test_viz_with_a_text_only_prompt_is_refused_with_the_fix(refused, tmp_path):
    refused(["--viz", str(tmp_path / "out.png"), "What is 2 + 2?"], "--viz", "--image, --video or --views")


@pytest.mark.parametrize("name, shown", [("out.xyz", ".xyz"), ("out", "a name without extension"),
                                         ("out.h5", ".h5"), ("out.xbm", ".xbm")])
def test_viz_to_a_file_pillow_cannot_write_says_which_to_use(refused, image, tmp_path, name, shown):
    # .h5 is a Pillow stub with no writer; XBM cannot hold an RGB picture
    refused(["--viz", str(tmp_path / name), "--image", image, "q"], f"cannot write an RGB picture as {shown}",
            ".png or .jpg")


def test_viz_into_a_missing_folder_is_refused(refused, image, tmp_path):
    refused(["--viz", str(tmp_path / "no" / "out.png"), "--image", image, "q"], "no folder", "create it")


def test_viz_alone_runs_the_demo_and_draws_its_pictures(tmp_path):
    result = cli("--viz", str(tmp_path / "out.png"))
    assert result.returncode == 0, result.stderr
    tasks = ("multi_image", "video", "multi_view", "multi_patch")
    for task in tasks:
        assert f"[{task}, expected answer: " in result.stdout
    assert sorted(os.listdir(tmp_path)) == sorted(f"out-{task}.png" for task in tasks)   # and no .partial file
    for task in tasks:
        assert Image.open(tmp_path / f"out-{task}.png").size[0] % sample.TILE == 0   # one square an image


# ---- prompts that are not UTF-8: argv, stdin, and one line of a chat

def test_a_prompt_argument_that_is_not_utf8_is_refused(refused):
    # Python keeps argv's bytes that are not UTF-8 as lone surrogates (here the byte 0xff)
    refused(["ab\udcffc"], "the prompt is not valid UTF-8", "character 2")


def test_a_prompt_that_is_not_utf8_on_argv_or_stdin_gives_one_line():
    one_line_error(cli(os.fsdecode(b"Caf\xe9?"), "--quiet"), "the prompt is not valid UTF-8")
    one_line_error(cli("--quiet", input=b"Caf\xe9 au lait?\n"), "the prompt on stdin is not valid UTF-8",
                   "0xe9", "UTF-8")


def test_a_chat_refuses_a_line_that_is_not_utf8_and_keeps_the_conversation():
    master, terminal = pty.openpty()   # the chat starts only when stdin is a terminal
    os.write(master, b"hello there\nsecond \xff\xfe line\nand then?\n\n")
    try:
        result = cli("--max-new-tokens", "3", stdin=terminal)
    finally:
        os.close(terminal)
        os.close(master)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("you: ") == 4 and result.stdout.count("model: ") == 2, result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "that line is not valid UTF-8" in errors[0] and "type it again" in errors[0]
    assert "Traceback" not in result.stderr
    # The second answered turn carries the first: the conversation was kept
    first, second = [int(line.split()[0]) for line in result.stderr.splitlines() if "prompt tokens" in line]
    assert second > first + 5


# ---- generation_config.json of the wrong types

@pytest.mark.parametrize("config, words", [
    ({"do_sample": True, "temperature": "hot"}, ["temperature is \"hot\"", "finite number"]),
    ({"do_sample": True, "top_k": 2.5}, ["top_k is 2.5", "whole number"]),
    ({"top_p": 0}, ["top_p is 0", "above 0"]),
    ({"temperature": float("nan")}, ["temperature is NaN"]),
    ({"repetition_penalty": True}, ["repetition_penalty is true"]),
    ({"max_new_tokens": 0}, ["max_new_tokens is 0"]),
    ({"max_new_tokens": "64"}, ["max_new_tokens is \"64\""]),
    ({"eos_token_id": "2"}, ["eos_token_id is \"2\"", "token id"]),
    ({"eos_token_id": [2, "0"]}, ["eos_token_id is [2, \"0\"]"]),
    ({"eos_token_id": -1}, ["eos_token_id is -1"]),
    ({"do_sample": "yes"}, ["do_sample is \"yes\"", "true or false"]),
    ([1, 2], ["the top level is [1, 2]", "not an object"]),
    ("greedy", ["the top level is \"greedy\""]),
])
def test_a_generation_config_of_the_wrong_types_names_the_file_field_and_value(tmp_path, config, words):
    file = tmp_path / "generation_config.json"
    file.write_text(json.dumps(config))
    args = sample.parse_args([])
    with pytest.raises(interleave.CheckpointError) as caught:
        sample.generation_settings(args, str(tmp_path), print)
    message = str(caught.value)
    assert message.startswith(str(file)) and "\n" not in message, message
    for word in words:
        assert word in message, (word, message)


def test_a_bad_generation_config_is_refused_in_one_line_before_the_model_loads(refused, tmp_path):
    folder = shutil.copytree(sample.EMBEDDED, tmp_path / "model")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": "2"}))
    refused(["--model", str(folder), "q"], "generation_config.json: eos_token_id is \"2\"")


def test_too_many_video_frames_are_refused_before_any_is_decoded(refused, monkeypatch, tmp_path):
    # The embedded model's context holds 4096 positions of 16 slots per frame: 256 frames at most.
    for i in range(300):
        Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(tmp_path / f"{i:03d}.png")
    decoded = []
    monkeypatch.setattr(interleave, "open_image", lambda path: decoded.append(path))
    refused(["--video", str(tmp_path), "--num-frames", "300", "What happens?"], "300 frames", "256")
    assert decoded == []
