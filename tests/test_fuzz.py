"""Fuzzing the parsers of what users and downloads hand us: safetensors headers, config.json and
training records. A seeded generator mutates valid inputs (values of every type, NaN, negative and
huge numbers, deleted and extra keys, deep nesting, flipped, cut and spliced bytes); each mutant
must load (or return) or raise our own error class, CheckpointError or InputError, never anything
else. Seeds are fixed: a failure names the mutant and reproduces."""
import copy
import json
import random
import shutil
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import interleave
from helpers import golden_path, write_tiny_tokenizer
from test_config import HF_7B, ORIGINAL_05B

# Values a mutation may put anywhere.
ODD_VALUES = [
    0, 1, -1, 2, 7, 2 ** 31, 2 ** 63, -2 ** 70, 10 ** 30, 0.5, -3.5, 1e300, float("nan"),
    float("inf"), float("-inf"), "", "x", "1024", "F32", "../../etc/passwd", "/etc/shadow",
    "\ud800", "<image>", "<image><image>", None, True, False, [], {}, [1, 2], [[384, 768]],
    {"a": 1}, [-8, 0], [0, 8], [2], [-2], ["2"],
]


def odd_value(rng, depth=0):
    """A value from ODD_VALUES, or a small random list / object / deep nest of them."""
    kind = rng.random()
    if kind < 0.75 or depth > 2:
        return copy.deepcopy(rng.choice(ODD_VALUES))
    if kind < 0.85:
        return [odd_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind < 0.95:
        return {rng.choice(["a", "dtype", "shape", "data_offsets", "from", "value"]): odd_value(rng, depth + 1)}
    nest = odd_value(rng, depth + 1)
    for _ in range(rng.randint(10, 300)):
        nest = [nest]
    return nest


def node_paths(tree, path=()):
    """Every path (tuple of keys and indices) to a node of a JSON-like tree, the root included."""
    yield path
    if isinstance(tree, dict):
        for key, child in tree.items():
            yield from node_paths(child, path + (key,))
    elif isinstance(tree, list):
        for i, child in enumerate(tree):
            yield from node_paths(child, path + (i,))


def mutate(tree, rng, extra_keys=()):
    """A copy of tree with 1-3 mutations: a node replaced, deleted, wrapped in a list, or a key added."""
    tree = copy.deepcopy(tree)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(list(node_paths(tree)))
        op = rng.choice(["replace", "replace", "delete", "wrap", "add"])
        if not path:
            if op in ("replace", "delete"):
                tree = odd_value(rng)
            elif op == "wrap":
                tree = [tree]
            continue
        parent = tree
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        if op == "replace":
            parent[key] = odd_value(rng)
        elif op == "delete":
            del parent[key]
        elif op == "wrap":
            parent[key] = [parent[key]]
        elif isinstance(parent[key], dict):
            parent[key][rng.choice(list(extra_keys) or ["extra"])] = odd_value(rng)
    return tree


def dumps(tree):
    """JSON text of a tree, NaN and Infinity included (Python's json reads them back)."""
    return json.dumps(tree, ensure_ascii=False)


# ---- safetensors headers

def header_and_data(file):
    raw = open(file, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def mutated_file(rng, header, data):
    """The bytes of a mutant: the header changed as JSON, or the file's bytes flipped, cut, spliced."""
    kind = rng.choice(["json", "json", "json", "flip", "cut", "splice", "length", "deep"])
    raw_header = dumps(header).encode("utf-8", "surrogatepass")
    if kind == "json":
        mutant = mutate(header, rng, ["dtype", "shape", "data_offsets", "__metadata__", "extra"])
        raw_header = dumps(mutant).encode("utf-8", "surrogatepass")
    elif kind == "flip":
        flipped = bytearray(raw_header)
        for _ in range(rng.randint(1, 4)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        raw_header = bytes(flipped)
    elif kind == "splice":
        a = rng.randrange(len(raw_header))
        b = rng.randrange(a, len(raw_header) + 1)
        at = rng.randrange(len(raw_header))
        raw_header = raw_header[:at] + raw_header[a:b] + raw_header[at:]
    elif kind == "deep":
        depth = rng.choice([1000, 200_000])
        raw_header = rng.choice([b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth])
    whole = struct.pack("<Q", len(raw_header)) + raw_header + data
    if kind == "cut":
        whole = whole[:rng.randrange(len(whole))]
    elif kind == "length":
        whole = struct.pack("<Q", rng.choice([0, 1, len(raw_header) - 1, len(raw_header) + 1, 2 ** 64 - 1])) + whole[8:]
    return whole


def test_mutated_safetensors_files_load_or_raise_checkpoint_error(tmp_path):
    source = tmp_path / "valid.safetensors"
    save_file({"w": torch.randn(3, 4), "ids": torch.arange(5), "h": torch.ones(2, dtype=torch.bfloat16),
               "empty": torch.zeros(0, 3)}, source, metadata={"format": "pt"})
    header, data = header_and_data(source)
    rng = random.Random(16)
    file = tmp_path / "mutant.safetensors"
    for attempt in range(400):
        file.write_bytes(mutated_file(rng, header, data))
        try:
            tensors = interleave.open_safetensors(str(file))
        except interleave.CheckpointError:
            continue
        except Exception as e:
            pytest.fail(f"mutant {attempt}: {type(e).__name__}: {e} for {file.read_bytes()[:300]!r}")
        assert all(isinstance(t, torch.Tensor) for t in tensors.values())


def test_mutated_checkpoints_load_or_raise_checkpoint_error(tmp_path):
    """The whole loader on the golden checkpoint: mutated weight headers and mutated config.json."""
    folder = tmp_path / "ckpt"
    shutil.copytree(golden_path("untied", "hf"), folder)
    header, data = header_and_data(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    rng = random.Random(7)
    for attempt in range(60):
        shutil.copy(golden_path("untied", "hf", "model.safetensors"), folder / "model.safetensors")
        shutil.copy(golden_path("untied", "hf", "config.json"), folder / "config.json")
        if attempt % 2:
            (folder / "model.safetensors").write_bytes(mutated_file(rng, header, data))
            what = "weights"
        else:
            (folder / "config.json").write_text(dumps(mutate(config, rng)), errors="surrogatepass")
            what = (folder / "config.json").read_text(errors="surrogatepass")[:300]
        try:
            interleave.load(folder)
        except interleave.CheckpointError:
            pass
        except Exception as e:
            pytest.fail(f"mutant {attempt}: {type(e).__name__}: {e} for {what}")


# ---- config.json

@pytest.mark.parametrize("name, config", [
    ("7b-hf", HF_7B), ("0.5b-original", ORIGINAL_05B),
    ("golden-hf", json.loads(open(golden_path("untied", "hf", "config.json")).read())),
    ("golden-original", json.loads(open(golden_path("anyres", "original", "config.json")).read())),
])
def test_mutated_configs_read_or_raise_checkpoint_error(name, config):
    rng = random.Random(name)
    keys = ["hidden_size", "num_hidden_layers", "rope_parameters", "image_grid_pinpoints", "text_config",
            "vision_config", "tie_word_embeddings", "rms_norm_eps", "head_dim", "image_token_index"]
    for attempt in range(300):
        mutant = mutate(config, rng, keys)
        try:
            interleave.config_from_dict(mutant)
        except interleave.CheckpointError:
            continue
        except Exception as e:
            pytest.fail(f"mutant {attempt}: {type(e).__name__}: {e} for {dumps(mutant)[:400]}")


# ---- training records

@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return interleave.load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def test_mutated_records_give_a_sample_or_raise_input_error(tok, tmp_path):
    folder = tmp_path / "images"
    (folder / "clip").mkdir(parents=True)
    rng_pixels = np.random.default_rng(0)
    for name in ["a.png", "b.png", "clip/0.png", "clip/1.png", "clip/2.png"]:
        pixels = rng_pixels.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
    (tmp_path / "outside.png").write_bytes((folder / "a.png").read_bytes())
    plain = interleave.read_config(golden_path("untied", "original"))
    anyres = interleave.read_config(golden_path("anyres", "original"))
    answer = [{"from": "gpt", "value": "the left one"}]
    records = [
        {"id": "two", "image": ["a.png", "b.png"],
         "conversations": [{"from": "human", "value": "<image> or <image>?"}] + answer},
        {"id": "one", "image": "a.png", "conversations": [{"from": "human", "value": "What?"}] + answer,
         "metadata": {"task": "x"}},
        {"id": "video", "video": "clip",
         "conversations": [{"from": "human", "value": "<image><image>\nWhere?"}] + answer},
        {"id": "text", "conversations": [{"from": "human", "value": "Hi"}] + answer},
    ]
    keys = ["image", "video", "conversations", "from", "value", "id", "metadata"]
    rng = random.Random(3)
    for attempt in range(300):
        record = mutate(rng.choice(records), rng, keys)
        config = rng.choice([plain, anyres])
        options = dict(max_len=rng.choice([None, 30, 4000]), num_frames=rng.randint(1, 4),
                       anyres=config is anyres)
        try:
            sample = interleave.record_to_sample(record, str(folder), tok, config, **options)
        except interleave.InputError:
            continue
        except Exception as e:
            pytest.fail(f"mutant {attempt}: {type(e).__name__}: {e} for {dumps(record)[:400]} {options}")
        assert len(sample.input_ids) == len(sample.labels)
