"""Train LLaVA-NeXT-Interleave on M4-Instruct data: a tiny model from scratch, or fine-tune one.

    python train.py --init tiny --synthetic 4000 --pretrain-tower 2500 --loss-on replies --out out/tiny  # as m4-tiny
    python train.py --init PATH --data m4.json --image-folder IMAGES --val val.json --out out/ft   # fine-tune
    torchrun --nproc_per_node 8 train.py ...      # the same run on 8 GPUs (DDP); --batch stays the global batch
    torchrun --nproc_per_node 8 train.py --fsdp ...   # the same, each GPU holding 1/8 of the model (FSDP2)

Checkpoints: llava-hf layout, hub key names (docs/MODEL.md §2), plus a top-level tensor `image_newline`
(multi-patch needs it; that layout has none): interleave.load reads it, transformers'
LlavaForConditionalGeneration ignores it (same logits). What --resume needs besides is in
trainer_state.json and trainer_state.safetensors: never a pickle, which could run code when read
(with --fsdp, the weights are in shards/, whose pickled table of contents is read with care: Sharding).
"""
import argparse
import codecs
import contextlib
import functools
import json
import math
import multiprocessing
import os
import pathlib
import pickle
import re
import shutil
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

import interleave
from data import make_m4
from interleave import IGNORE, CheckpointError, InputError

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
# bf16 dense peak TFLOPS, by a part of the GPU's name: the MFU of the log lines
PEAK_TFLOPS = {"H100": 989, "H200": 989, "B200": 2250, "A100": 312, "L40S": 362, "L4": 121, "A10": 125}
# interleave's (VisionConfig, TextConfig) fields; defaults: SigLIP so400m, the tokenizer's vocab
PRESETS = {
    "tiny": (dict(hidden=128, intermediate=512, heads=4, layers=2, image_size=64, patch_size=16),
             dict(hidden=160, intermediate=480, heads=5, kv_heads=5, head_dim=32, layers=4,
                  rope_theta=1e4)),
    "0.5b-random": ({}, dict(hidden=1024, intermediate=2816, heads=16, kv_heads=16, head_dim=64,
                             layers=24, vocab=151936, rope_theta=1e6, max_positions=32768)),
}
# interleave's config fields -> llava-hf config.json names, for the vision and the text config
_SHARED = dict(hidden="hidden_size", intermediate="intermediate_size", heads="num_attention_heads",
               layers="num_hidden_layers")
HF_NAMES = {
    "vision": dict(_SHARED, eps="layer_norm_eps", image_size="image_size", patch_size="patch_size",
                   act="hidden_act"),
    "text": dict(_SHARED, eps="rms_norm_eps", kv_heads="num_key_value_heads", head_dim="head_dim",
                 vocab="vocab_size", rope_theta="rope_theta",
                 max_positions="max_position_embeddings", tie_embeddings="tie_word_embeddings"),
}
HUB_PREFIXES = {"vision": "vision_tower.vision_model.", "decoder": "language_model.model.",
                "projector": "multi_modal_projector.", "lm_head": "language_model.lm_head."}


def opt(default, help, least=None, most=None):
    """A Config field: its default, its line of --help, and the range of numbers it accepts."""
    return field(default=default, metadata={"help": help, "least": least, "most": most})


@dataclass
class Config:
    """The run's settings; main makes one command-line option of each field."""
    init: str = opt("tiny", "'tiny' or '0.5b-random' (fresh weights) or a checkpoint folder to fine-tune")
    out: str = opt("out/run", "run folder: step-N/ checkpoints, latest (a link to the last), loss.png")
    data: str = opt("", "training records: M4-Instruct JSON (a list) or JSON Lines")
    image_folder: str = opt("", "where the records' image and video paths start (default: the data file's folder)")
    val: str = opt("", "held-out records: loss and exact-match accuracy per metadata.task")
    synthetic: int = opt(0, "instead of --data: draw this many records per task (data/make_m4.py) into OUT/data",
                         least=0)
    steps: int = opt(2000, "optimizer steps", least=1)
    batch: int = opt(32, "records per step, over all processes", least=1)
    budget: int = opt(1024, "tokens per packed sequence; a longer sample is truncated to it", least=1)
    lr: float = opt(2e-3, "peak learning rate of AdamW (weight decay 0.05 on matrices, gradient norm clipped at 1)")
    warmup: int = opt(100, "steps of linear warmup; then a cosine down to a tenth of --lr", least=0)
    pretrain_tower: int = opt(0, "--init tiny: first train the tower alone for this many steps (stage 0)",
                              least=0)
    train_vision: bool = opt(False, "fine-tuning: train the vision tower too (from scratch it always is)")
    grad_ckpt: bool = opt(False, "activation checkpointing: recompute each block in the backward pass")
    lora: int = opt(0, "LoRA rank: train low-rank adapters beside the frozen decoder linears "
                    "(the release's LoRA runs: 64); 0: off, train the weights themselves", least=0)
    lora_alpha: int = opt(16, "LoRA: the adapters' update is scaled by alpha / rank (release: 16)",
                          least=1)
    lora_targets: str = opt("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                            "LoRA: the decoder linears that get adapters, comma-separated")
    bf16: bool = opt(None, "bf16 autocast (default: on a GPU)")
    attn: str = opt("", "plain, sdpa or triton (default: triton on a GPU, else sdpa)")
    seed: int = opt(0, "seeds the weights, the data order and the synthetic data", least=0, most=2**63 - 1)
    eval_every: int = opt(250, "steps between evaluations on 200 held-out records (all of them at the end)",
                          least=0)
    save_every: int = opt(250, "steps between checkpoints (one is also written at the end; 0: none at all)",
                          least=0)
    resume: bool = opt(False, "continue from OUT/latest: model, optimizer, schedule, step, data position, RNG")
    export: str = opt("", "also write the final model, without optimizer state, to this folder")
    loss_on: str = opt("release", "labels (docs/MODEL.md §5): 'release', as the release trains, or 'replies' only")
    fsdp: bool = opt(False, "shard weights, gradients and optimizer state over the torchrun processes (FSDP2)")


def check_options(cfg):
    """Raise InputError, one line, for the first option out of its range (before anything is
    built)."""
    for f in fields(Config):
        value = getattr(cfg, f.name)
        least = f.metadata["least"]
        most = f.metadata["most"]
        if least is not None and not least <= value <= (math.inf if most is None else most):
            accepted = f"at least {least}" if most is None else f"{least} .. {most}"
            raise InputError(f"--{f.name.replace('_', '-')} {value}: must be {accepted}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise InputError(f"--lr {cfg.lr}: must be a positive, finite number (2e-3 is the default)")
    if cfg.loss_on not in interleave.LOSS_RULES:
        raise InputError(f"--loss-on {cfg.loss_on!r}: choose one of {', '.join(interleave.LOSS_RULES)}")
    if cfg.attn not in ("", "plain", "sdpa", "triton"):
        raise InputError(f"--attn {cfg.attn!r}: must be plain, sdpa or triton")
    if not (cfg.data or cfg.synthetic):
        raise InputError("no training records: give --data FILE, or --synthetic N to draw them")
    if not (cfg.resume or cfg.init in PRESETS or os.path.isdir(cfg.init)):
        raise InputError(f"--init {cfg.init}: neither a preset ({', '.join(PRESETS)}) "
                         "nor a checkpoint folder")
    check_lora_options(cfg)


def checkpoints(out):
    """{step: folder name} of the checkpoints step-N in the run folder `out` (none if absent)."""
    names = os.listdir(out) if os.path.isdir(out) else []
    return {int(name[5:]): name for name in names if re.fullmatch(r"step-\d+", name)}


def check_run_folder(cfg):
    """Raise InputError, one line, for a fresh run into a folder that holds checkpoints (its own
    would be mixed with them, and the rotation would delete one or the other), and for --resume
    with nothing to resume from."""
    latest = os.path.join(cfg.out, "latest")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise InputError(f"--out {cfg.out} is a file, not a folder: give another --out")
    if cfg.resume and not os.path.isdir(latest):
        raise InputError(f"--resume: there is no checkpoint {latest} to resume from; "
                         "start without --resume")
    held = sorted(checkpoints(cfg.out).values())
    if os.path.lexists(latest):
        held.append("latest")
    if held and not cfg.resume:
        raise InputError(f"{cfg.out} already holds checkpoints ({', '.join(held[-3:])}): continue "
                         "that run with --resume, or start a new one with another --out")
    if cfg.resume:
        check_sharding_matches(latest, cfg.fsdp)


# ==== Data: records (unusable ones skipped and counted), their order, a tokenizer trained on them

EXPECTED = ("a JSON list of records (as M4-Instruct ships) or JSON Lines (one record, a JSON "
            "object, a line)")
JSON_KINDS = {dict: "object", list: "list", str: "string", int: "number", float: "number",
              bool: "boolean", type(None): "null"}


def read_records(path, skip):
    """The records of a JSON list (a file that starts with "[") or of JSON Lines. Raises InputError
    for a file that is neither, or a JSON list with a syntax error (its line and column); skips,
    with their numbers, the lines that are not UTF-8 JSON and the items that are not objects."""
    try:
        data = pathlib.Path(path).read_bytes().removeprefix(codecs.BOM_UTF8)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None
    if data.lstrip().startswith(b"["):
        items = read_json_list(path, data)
        numbered = [(f"{path} item {n}", item) for n, item in enumerate(items, start=1)]
    else:
        lines = data.splitlines()
        # An object over several lines (indented) would be skipped line by line: say what it is
        if sum(1 for line in lines if line.strip()) > 1 and parses_as_json(data):
            raise InputError(f"{path} holds one JSON value that is not a list; expected {EXPECTED}")
        numbered = []
        for n, line in enumerate(lines, start=1):
            where = f"{path} line {n}"
            if not line.strip():
                continue
            try:
                numbered.append((where, json.loads(line.decode("utf-8"))))
            except UnicodeDecodeError as e:
                skip(f"{where} is not UTF-8 ({e.reason} at byte {e.start + 1})", where)
            except (json.JSONDecodeError, RecursionError) as e:
                skip(f"{where} is not JSON ({e})", where)
    records = []
    for where, item in numbered:
        if isinstance(item, dict):
            records.append(item)
        else:
            kind = JSON_KINDS[type(item)]
            skip(f"{where} is a JSON {kind}, not a record (a JSON object)", where)
    return records


def read_json_list(path, data):
    """The items of a file that starts with "[" (bytes `data`): one JSON list. Raises InputError
    naming the line (and column) of a byte that is not UTF-8 or of a syntax error."""
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(f"{path} line {line} is not UTF-8 ({e.reason}); a file that starts "
                         "with '[' is read as one JSON list") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path} line {e.lineno} column {e.colno}: {e.msg}; a file that starts "
                         "with '[' is read as one JSON list") from None
    except RecursionError:
        raise InputError(f"{path} is nested too deeply to be a list of records") from None


def parses_as_json(data):
    """Whether the bytes `data` are one JSON value (then they are not JSON Lines)."""
    # UnicodeDecodeError and JSONDecodeError are ValueErrors
    with contextlib.suppress(ValueError, RecursionError):
        json.loads(data)
        return True
    return False


class SkippedRecords:
    """skip(why, key) for an unusable record: counted once per key (a record skipped again in a
    later epoch, or at each evaluation, is counted once), the reason kept (.reasons, by key; .last);
    the first five printed."""

    def __init__(self):
        self.reasons = {}
        self.last = None

    def __call__(self, why, key):
        self.last = why
        if key in self.reasons:
            return
        self.reasons[key] = why
        if len(self.reasons) <= 5:
            more = " (further reasons are not printed)" if len(self.reasons) == 5 else ""
            print(f"skipped: {why}{more}", flush=True)


def load_records(cfg, rank, skip):
    """(training records, held-out records), read from --data and --val; with --synthetic and no
    --data, drawn first into OUT/data by rank 0 while the others wait. InputError if none is
    usable."""
    if cfg.synthetic and not cfg.data:
        folder = os.path.join(cfg.out, "data")
        cfg.data = os.path.join(folder, "train.json")
        cfg.val = os.path.join(folder, "val.json")
        # a resumed run keeps the records it drew
        if rank == 0 and not (cfg.resume and os.path.exists(cfg.val)):
            make_m4.main(["--out", folder, "--train", str(cfg.synthetic), "--seed", str(cfg.seed)])
    os.makedirs(cfg.out, exist_ok=True)
    dist.barrier()
    cfg.image_folder = cfg.image_folder or os.path.dirname(os.path.abspath(cfg.data))
    records = read_records(cfg.data, skip)
    val = read_records(cfg.val, skip) if cfg.val else []
    if not records:
        raise InputError(f"no usable records in {cfg.data}; expected {EXPECTED}")
    return records, val


def to_sample(record, cfg, tokenizer, mcfg, max_len=None, loss_on=None):
    """(Sample, None), or (None, why the record cannot be used). A lone image goes multi-patch (as
    released) if there is image_newline. Its labels follow loss_on, by default --loss-on."""
    # interleave.InputError, which a malformed record raises, is a ValueError
    try:
        sample = interleave.record_to_sample(record, cfg.image_folder, tokenizer, mcfg, max_len,
                                             anyres=mcfg.has_image_newline,
                                             loss_on=loss_on or cfg.loss_on)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, OSError) as e:
        name = record.get("id") if isinstance(record, dict) else record
        return None, f"record {name!r:.80}: {e}"
    return sample, None


def start_loader(run):
    """In each loader process: keep the run's (cfg, tokenizer, model config), passed rather than
    inherited so that spawning (macOS, Windows) works as forking does; one thread, as in torch's
    DataLoader; and exit when the trainer is gone."""
    global LOADER
    LOADER = run
    torch.set_num_threads(1)
    watchdog = threading.Thread(target=exit_with_trainer, args=(os.getppid(),), daemon=True)
    watchdog.start()


def exit_with_trainer(trainer):
    """A loader process's watchdog: exit once its parent, the trainer (process id `trainer`), is
    gone. A trainer killed outright (SIGKILL, out of memory) cannot shut its loader processes down,
    and they would wait for work forever (torch's DataLoader workers watch the same way)."""
    parent = multiprocessing.parent_process()
    # Unix gives an orphan a new parent; on Windows the parent's sentinel (a handle) turns ready
    while os.getppid() == trainer and parent.is_alive():
        time.sleep(0.5)
    os._exit(1)


def prepare(record):
    """(Sample or None, why skipped) for the next step, pickled by value here, not as torch's
    shared-memory handles."""
    cfg, tokenizer, mcfg = LOADER
    return pickle.dumps(to_sample(record, cfg, tokenizer, mcfg, cfg.budget))


@functools.lru_cache(maxsize=2)
def permutation(n, seed, epoch):
    """The record order of an epoch: the data position is then one integer."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def submit_batch(pool, records, cfg, start, rank, world):
    """(record index, future) of this process's share of the batch at data position `start`,
    prepared by the loader processes: the records at start + rank, start + rank + world, ... below
    start + batch."""
    n = len(records)
    futures = []
    for i in range(start + rank, start + cfg.batch, world):
        index = permutation(n, cfg.seed, i // n)[i % n]
        futures.append((index, pool.submit(prepare, records[index])))
    return futures


def take_batch(futures, skip):
    """The usable samples of the futures from submit_batch; the reasons of the others go to skip,
    by record index: a record drawn again in a later epoch is counted once."""
    samples = []
    for index, future in futures:
        sample, why = pickle.loads(future.result())
        if sample is None:
            skip(why, ("train", index))
        else:
            samples.append(sample)
    return samples


def pack_batch(samples, budget):
    """The step's samples packed into Samples of at most `budget` tokens (docs/MODEL.md §5)."""
    packs = interleave.pack_samples(samples, budget, verbose=False)
    if not packs:
        # none usable: a pack without labels has no loss, but keeps this process in step with DDP's
        packs = [empty_pack()]
    return packs


def empty_pack():
    """A pack of two padding tokens without labels: no loss, no gradient."""
    return interleave.Sample(torch.tensor([0, 0]), torch.full((2,), IGNORE), None, [],
                             torch.arange(2), torch.tensor([0, 2], dtype=torch.int32))


def train_tokenizer(records, vocab_size=512):
    """Qwen2-style byte-level BPE trained on the corpus (deterministic), with the template's
    specials and <image>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [interleave.SYSTEM_PROMPT, "system\nuser\nassistant\n"]
    for record in records:
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(turns, list):
            continue
        for turn in turns:
            if isinstance(turn, dict) and isinstance(turn.get("value"), str):
                # a lone surrogate (JSON's "\ud800") has no UTF-8: replaced by "?"
                text = turn["value"].encode("utf-8", "replace").decode()
                texts.append(text.replace("<image>", "\n"))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  show_progress=False, initial_alphabet=alphabet)
    tok.train_from_iterator(texts, trainer)
    return tok


# ==== Model: fresh (stage 0, below, trains its tower first) or loaded

def fresh_model(preset, tokenizer, seed, tower_steps=0, log=print):
    """A model of PRESETS[preset], fresh weights (seeded); then `tower_steps` of stage 0."""
    vision_fields, text_fields = PRESETS[preset]
    vision = interleave.VisionConfig(**vision_fields)
    # the vocabulary rounded up to a multiple of 64; the preset's own fields win
    vocab = -(-tokenizer.get_vocab_size() // 64) * 64
    text = interleave.TextConfig(**{"vocab": vocab, "max_positions": 4096, "tie_embeddings": True,
                                    **text_fields})
    # multi-patch canvases of 1x2 .. 3x1 tiles of the tower's image size; image_newline as released
    tiles = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
    canvases = [[vision.image_size * a, vision.image_size * b] for a, b in tiles]
    image_token_id = tokenizer.token_to_id("<image>")
    config = interleave.ModelConfig(vision, text, "hf", image_token_id=image_token_id,
                                    grid_pinpoints=canvases, has_image_newline=True)
    torch.manual_seed(seed)
    model = interleave.LlavaInterleave(config)
    # N(0, 0.02) weights, zero biases; norms stay 1 and 0
    for name, p in model.named_parameters():
        if "norm" in name:
            continue
        if p.dim() > 1 or name == "image_newline":
            torch.nn.init.normal_(p, std=0.02)
        else:
            torch.nn.init.zeros_(p)
    # stage 0 (by default none): the release, too, starts from a pretrained SigLIP
    return pretrain(model, tower_steps, seed, log)


def checkpoint_source(cfg):
    """The checkpoint folder the run starts from: OUT/latest with --resume, else --init's folder
    (a LoRA run resumes from its base, --init, and the adapters in OUT/latest)."""
    return os.path.join(cfg.out, "latest") if cfg.resume and not cfg.lora else cfg.init


def build_tokenizer(cfg, records):
    """A fresh preset's tokenizer, trained on the records (deterministic: every process trains the
    same one); else the checkpoint's."""
    if cfg.init in PRESETS and not cfg.resume:
        return train_tokenizer(records)
    return interleave.load_tokenizer(checkpoint_source(cfg))


def check_budget(budget, tokenizer):
    """Raise InputError for a --budget that cannot hold the shortest sample: the chat template
    around an empty question, and one token of a reply."""
    template = tokenizer.encode(interleave.chat_prompt(""), add_special_tokens=False).ids
    if budget <= len(template):
        raise InputError(f"--budget {budget}: the chat template alone takes {len(template)} "
                         "tokens, and a sample needs a reply too; raise it (1024 is the default)")


def trains_vision(cfg):
    """Whether the run trains the vision tower: a fresh tiny model's always (stage 0 only starts
    it), a checkpoint's (or a larger preset's) with --train-vision only."""
    return cfg.init == "tiny" or cfg.train_vision


def uses_bf16(cfg, cuda):
    """Whether the run computes in bf16: --bf16 when given, else on a GPU."""
    return cuda if cfg.bf16 is None else cfg.bf16


def run_mode(cfg):
    """How the run keeps its state on a GPU: "lora", "fsdp" or "full" (the memory plan's modes)."""
    if cfg.lora:
        return "lora"
    return "fsdp" if cfg.fsdp else "full"


def attention_impl(cfg, cuda):
    """--attn when given, else the kernel on a GPU and SDPA on the CPU."""
    return cfg.attn or ("triton" if cuda else "sdpa")


def build_model(cfg, tokenizer, device, cuda, log):
    """The model on `device`, in training mode: fresh for a preset, else loaded from the checkpoint
    to fine-tune, or with --resume from OUT/latest."""
    if cfg.init in PRESETS and not cfg.resume:
        model = fresh_model(cfg.init, tokenizer, cfg.seed, cfg.pretrain_tower, log)
    elif cfg.fsdp and cfg.resume:
        # its weights come from the shards, once it is sharded (resume)
        model = unfilled_model(checkpoint_source(cfg))
    else:
        model = interleave.load(checkpoint_source(cfg), dtype=torch.float32)
    check_memory(model, cfg, device, log)
    return model.to(device).train().set_attention(attention_impl(cfg, cuda))


# ==== Stage 0: the tiny model's vision tower trained alone on the shapes and colours of pictures
#
# The release starts from a pretrained SigLIP (LLaVA never trains its vision encoder from scratch),
# and so does the tiny model with `--pretrain-tower N` (fresh_model calls pretrain). Trained end to
# end from scratch, the tiny tower learns the shapes only through the decoder's replies, and slowly:
# after 3,500 steps it named the shape of a held-out multi-image picture 57% of the time (colour
# 100%). Trained directly, with a linear head on the mean of its features, it names it 96-97% of the
# time after 2,500 steps of 64 pictures (2.5 minutes on one CPU thread, 33 s of it drawing). The
# pictures, drawn by data/make_m4.py (split "pretrain": never a training or held-out one), are the
# three of each multi-image example and the 64-pixel tile that holds each small mark, labelled with
# their shape and colour. The two heads are then thrown away; the tower trains on with the model.

SHAPES = list(make_m4.SHAPES)
COLOURS = list(make_m4.COLOURS)


def mark_tile(image, size):
    """The size x size multi-patch tile of a make_m4 multi-patch picture that holds the centre of
    its small mark (the mean of the only saturated pixels: the background is grey)."""
    rgb = np.asarray(image.convert("RGB")).astype(int)
    rows, cols = np.nonzero(rgb.max(-1) - rgb.min(-1) > 60)
    left = int(cols.mean() // size) * size
    top = int(rows.mean() // size) * size
    return image.crop((left, top, left + size, top + size))


def labelled_pictures(count, seed, size):
    """(pixels (n, 3, size, size), shape indices (n,), colour indices (n,)): `count` examples of
    each task, 3 pictures per multi-image example and the mark's tile of each multi-patch one."""
    pixels = []
    shapes = []
    colours = []
    for i in range(count):
        for task in ("multi_image", "multi_patch"):
            images, _, _, _, about = make_m4.make_example(task, seed, "pretrain", i, size)
            # "red circle, red square, red circle" or "blue triangle"
            described = about[0][1].split(", ")
            if task == "multi_patch":
                images = [mark_tile(images[0], size)]
            for image, words in zip(images, described):
                colour, shape = words.split()
                pixels.append(interleave.image_to_pixels(image, size))
                shapes.append(SHAPES.index(shape))
                colours.append(COLOURS.index(colour))
    return torch.stack(pixels), torch.tensor(shapes), torch.tensor(colours)


def pretrain(model, steps, seed, log=print, batch=64, lr=1e-3, count=6000, held_out=500):
    """Train model.vision in place, `steps` AdamW steps on shape and colour; return the model (0
    steps: unchanged). Refuses a tower for pictures over 128 pixels."""
    tower = model.vision
    size = tower.config.image_size
    if not steps:
        return model
    # count * 4 pictures are held in memory: 24,000 at 384 pixels would take 42 GB
    if size > 128:
        sys.exit(f"--pretrain-tower is made for the tiny preset's 64-pixel tower, "
                 f"not a {size}-pixel one")
    pixels, shapes, colours = labelled_pictures(count, seed, size)
    # the last `held_out` pictures only measure what the tower learned
    n = len(pixels) - held_out
    shape_head = torch.nn.Linear(tower.config.hidden, len(SHAPES))
    colour_head = torch.nn.Linear(tower.config.hidden, len(COLOURS))
    trained = [*tower.parameters(), *shape_head.parameters(), *colour_head.parameters()]
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.05)
    order = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, n, (batch,), generator=order)
        features = tower(pixels[i]).mean(1)   # (batch, hidden): the mean over the picture's tokens
        shape_loss = F.cross_entropy(shape_head(features), shapes[i])
        loss = shape_loss + F.cross_entropy(colour_head(features), colours[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        features = tower(pixels[n:]).mean(1)   # (held_out, hidden)
        shape_right = (shape_head(features).argmax(-1) == shapes[n:]).float().mean().item()
        colour_right = (colour_head(features).argmax(-1) == colours[n:]).float().mean().item()
    log(f"pretrained the vision tower: {steps} steps on {n} pictures; on {held_out} others it "
        f"names the shape {100 * shape_right:.1f}% and the colour {100 * colour_right:.1f}% "
        "of the time", flush=True)
    return model


# ==== Optimizer: the trained parameters, AdamW, resuming a run, the learning-rate schedule

def trained_parameters(model, train_vision, grad_ckpt):
    """The parameters to train: the tower's only if `train_vision`, and never its post_layernorm,
    stored but never applied (docs/MODEL.md §1). grad_ckpt: blocks recompute when going backward."""
    for name, p in model.vision.named_parameters():
        p.requires_grad_(train_vision and not name.startswith("post_layernorm"))
    if grad_ckpt:
        for block in [*model.decoder.layers, *model.vision.layers]:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params, cfg, cuda):
    """AdamW, weight decay 0.05 on the matrices and none on biases, norms and image_newline."""
    groups = [{"params": [p for p in params if p.dim() > 1], "weight_decay": 0.05},
              {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=cuda)


def resume(cfg, wrapped, optimizer, device, cuda):
    """(step, data position, loss history, evaluations) to start from; with --resume, those of
    OUT/latest's trainer state, whose optimizer moments and random generators are restored too
    (with --fsdp, the weights and moments from its shards)."""
    if not cfg.resume:
        return 0, 0, [], []
    folder = os.path.join(cfg.out, "latest")
    state = read_trainer_state(folder)
    if cfg.fsdp:
        load_shards(folder, wrapped, optimizer, state["optimizer"]["param_groups"])
    else:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{folder}: its optimizer state does not fit this run's trained "
                                  f"parameters ({e}); resume with the options it was written "
                                  "with") from None
    torch.set_rng_state(state["rng"])
    if cuda and state["cuda_rng"] is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return state["progress"]


def get_lr(step, cfg):
    """The learning rate of the optimizer step after `step` steps: a linear warmup to --lr over
    --warmup steps, then a cosine that reaches a tenth of --lr at step --steps (so the last step
    that runs, --steps - 1, is just above it)."""
    # 1) linear warmup: the warmup's last step reaches --lr
    if step < cfg.warmup:
        return cfg.lr * ((step + 1) / cfg.warmup)
    # 2) after it, a cosine from --lr (progress 0) down to --lr / 10 (progress 1)
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


# ==== LoRA: low-rank adapters beside the frozen decoder linears (Hu et al., arXiv 2106.09685)
#
# A targeted linear y = x W^T + b keeps W and b frozen and gains two small trained matrices,
# A (r, in) and B (out, r): y = x W^T + b + (alpha / r) (x A^T) B^T. B starts at zero, so before
# the first step the model computes exactly what the base model does. Only A and B are trained:
# at rank 64, 2.5% as many weights as the 7B decoder's matrices, and no gradient or AdamW state for
# the rest. The release's LoRA runs (LLaVA-NeXT's llava/train/train.py) use rank 64, alpha 16, and
# every linear of the language model but lm_head as targets; their dropout (0.05) is left out
# here. Everything else stays frozen (the projector too, which their runs train in full), so the
# adapter file is the whole fine-tune; --train-vision is refused. On a GPU the frozen weights of
# the targeted linears, most of the model, are kept in bf16; the rest (embedding, lm_head, tower,
# projector) stays fp32, as the evaluation runs without autocast.
#
# Export: every checkpoint holds the merged model (W + (alpha / r) B A, the usual layout) and, in
# its subfolder adapter/, the adapters alone in PEFT's layout (adapter_config.json,
# adapter_model.safetensors) under the names PEFT gives them in transformers'
# LlavaForConditionalGeneration: PeftModel.from_pretrained(model, "FOLDER/adapter") reads them.
# --resume rebuilds the base from --init and reads the adapters back from OUT/latest.

# In a subfolder: transformers, when peft is installed, applies an adapter_config.json it finds
# beside a model's files when it loads them, and would add the adapters to the merged weights again.
ADAPTER = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class LoRALinear(torch.nn.Module):
    """A frozen linear (its weight and bias, the same Parameters) plus a trained low-rank update:
    y = x W^T + b + (alpha / rank) (x A^T) B^T, with B zero at first."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.weight = base.weight
        self.bias = base.bias
        self.alpha = alpha
        self.scale = alpha / rank
        where = dict(device=base.weight.device, dtype=base.weight.dtype)
        # PEFT's names; A keeps nn.Linear's initialisation (Kaiming uniform), as in PEFT
        self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False, **where)
        self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False, **where)
        torch.nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        # the frozen path in its weights' dtype (bf16 on a GPU), the adapters' in theirs (fp32)
        y = F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)
        update = self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype)))
        return y + self.scale * update.to(x.dtype)

    def merged_weight(self):
        """W + (alpha / rank) B A, in fp32: the one matrix this module applies."""
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()   # (out, in)
        return self.weight.float() + self.scale * delta


def check_lora_options(cfg):
    """Raise InputError, one line, for LoRA options that cannot work together."""
    if not cfg.lora:
        return
    wrong = set(cfg.lora_targets.split(",")) - set(Config.lora_targets.split(","))
    if wrong or not cfg.lora_targets:
        raise InputError(f"--lora-targets {cfg.lora_targets!r}: choose among "
                         f"{Config.lora_targets} (comma-separated)")
    if cfg.init in PRESETS or not os.path.isdir(cfg.init):
        raise InputError(f"--lora adapts a trained model: give --init a checkpoint folder, not "
                         f"{cfg.init!r} (with --resume too: the base the run started from)")
    if cfg.train_vision:
        raise InputError("--lora trains the adapters only: drop --train-vision, or fine-tune "
                         "without --lora")
    if cfg.fsdp:
        raise InputError("--lora and --fsdp together are not supported: LoRA fits one GPU "
                         "(torchrun without --fsdp replicates it with DDP)")


def add_lora(model, cfg, params, bf16_base):
    """The parameters to train: without --lora, `params`. With it, freeze the model and put an
    adapter (seeded by --seed) beside each --lora-targets linear of the decoder; with `bf16_base`
    those linears' frozen weights go to bf16; with --resume, read the adapters back from
    OUT/latest; then the adapters' parameters are the trained ones."""
    if not cfg.lora:
        return params
    model.requires_grad_(False)
    targets = cfg.lora_targets.split(",")
    torch.manual_seed(cfg.seed)
    for name, module in list(model.decoder.named_modules()):
        parent, _, leaf = name.rpartition(".")
        if leaf not in targets or not isinstance(module, torch.nn.Linear):
            continue
        # the adapters take the weights' dtype (fp32); then the frozen weights may go to bf16
        adapted = LoRALinear(module, cfg.lora, cfg.lora_alpha)
        if bf16_base:
            adapted.weight.data = adapted.weight.data.to(torch.bfloat16)
        if bf16_base and adapted.bias is not None:
            adapted.bias.data = adapted.bias.data.to(torch.bfloat16)
        setattr(model.decoder.get_submodule(parent), leaf, adapted)
    if cfg.resume:
        latest = os.path.join(cfg.out, "latest")
        check_lora_resume(latest, cfg)
        read_adapter(os.path.join(latest, ADAPTER), model)
    return [p for name, p in model.named_parameters() if ".lora_" in name]


def merged_state_dict(model):
    """model.state_dict() with each adapter merged into its linear's weight (fp32) and the
    adapters' own tensors left out: the state dict of the base model's shape."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            state[name + ".weight"] = module.merged_weight()
            del state[name + ".lora_A.weight"]
            del state[name + ".lora_B.weight"]
    return state


def peft_key(name):
    """Our adapter parameter's name -> PEFT's in transformers' LlavaForConditionalGeneration:
    decoder.layers.0.gate_proj.lora_A.weight ->
    base_model.model.model.language_model.layers.0.mlp.gate_proj.lora_A.weight."""
    linear, _, part = name.partition(".lora_")   # "decoder.layers.0.gate_proj", "A.weight"
    # the hub's name: language_model.model.layers.0.mlp.gate_proj.weight
    module = hub_key(linear + ".weight").removesuffix(".weight")
    # transformers' module names (those of 5.24, checked with peft) nest it as model.language_model
    module = module.replace("language_model.model.", "model.language_model.", 1)
    return f"base_model.model.{module}.lora_{part}"


def write_adapter(folder, model):
    """A LoRA model's adapters alone, in PEFT's layout: adapter_model.safetensors (fp32) and
    adapter_config.json, each atomically; nothing for a model without adapters."""
    adapters = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not adapters:
        return
    tensors = {}
    for name, p in model.named_parameters():
        if ".lora_" in name:
            tensors[peft_key(name)] = p.detach().float().contiguous().cpu()
    first = next(iter(adapters.values()))
    targets = sorted({name.rpartition(".")[2] for name in adapters})
    # a pattern, not a list of names: the tower's q_proj, k_proj, v_proj are not targets
    pattern = rf".*language_model.*\.({'|'.join(targets)})"
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
              "r": first.lora_A.out_features, "lora_alpha": first.alpha, "lora_dropout": 0.0,
              "target_modules": pattern, "bias": "none", "fan_in_fan_out": False,
              "modules_to_save": None, "init_lora_weights": True, "inference_mode": True}
    text = json.dumps(config, indent=2)
    os.makedirs(folder, exist_ok=True)
    atomic(os.path.join(folder, ADAPTER_WEIGHTS),
           lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic(os.path.join(folder, ADAPTER_CONFIG), lambda tmp: pathlib.Path(tmp).write_text(text))


def check_lora_resume(folder, cfg):
    """Raise CheckpointError when the run that wrote `folder` had another base or rank."""
    try:
        written = json.loads(pathlib.Path(folder, STATE_JSON).read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read the trainer state of {folder} ({e!r:.200})") from None
    if written.get("init") != cfg.init or written.get("lora") != cfg.lora:
        raise CheckpointError(f"{folder} was written by a run with --init {written.get('init')} "
                              f"--lora {written.get('lora')}: resume with those")


def read_adapter(folder, model):
    """Copy the adapters that write_adapter wrote into `folder` into the model's (adapted alike).
    CheckpointError for a file that is missing or lacks one of them."""
    try:
        tensors = load_file(os.path.join(folder, ADAPTER_WEIGHTS))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read the LoRA adapters of {folder} ({e!r:.200})") from None
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" not in name:
                continue
            stored = tensors.get(peft_key(name))
            if stored is None or stored.shape != p.shape:
                raise CheckpointError(f"{folder}: no adapter {peft_key(name)} of shape "
                                      f"{list(p.shape)}; resume with the --lora-targets it had")
            p.copy_(stored)


# ==== Memory plan: the bytes per GPU of a run, printed before step 1, a run that cannot fit refused
#
# Counted from the parameters' shapes alone (a model on the meta device will do): weights,
# gradients and AdamW's two moments, each for what this mode keeps on one GPU, and an estimate of
# the activations of one pack of --budget tokens (the packs of a step run one after another).
# Not counted: the CUDA context, the allocator's fragmentation, the loader processes.

GIB = 2 ** 30


@dataclass
class MemoryPlan:
    """Bytes per GPU, by what they hold."""
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self):
        return self.weights + self.gradients + self.optimizer + self.activations


def linear_sites(model, targets):
    """(in, out) of each decoder linear named in `targets` (LoRA's sites, adapted or not yet)."""
    sites = []
    for name, module in model.decoder.named_modules():
        if name.rpartition(".")[2] in targets and hasattr(module, "weight"):
            out_features, in_features = module.weight.shape
            sites.append((in_features, out_features))
    return sites


def activation_bytes(c, tokens, grad_ckpt, act, train_vision):
    """An estimate of what the backward pass keeps of one pack of `tokens` tokens (`act`: 2 bytes
    in bf16, else 4): per decoder block and token, the two norms' inputs and outputs, q, k, v, the
    attention's output, the MLP's gate, up, SiLU and product (and the norms' fp32 copies in bf16);
    with grad_ckpt only each block's input, plus one block recomputed. Then the head's logits (bf16,
    their fp32 copy, the softmax's) at every token, and with train_vision the tower's blocks alike
    for the views the pack could hold."""
    t = c.text
    kv = t.kv_heads * t.head_dim
    fp32_copies = 2 * 4 * t.hidden if act == 2 else 0
    per_token = act * (6 * t.hidden + 2 * kv + 4 * t.intermediate) + fp32_copies
    if grad_ckpt:
        decoder = tokens * (t.layers * act * t.hidden + per_token)
    else:
        decoder = tokens * t.layers * per_token
    head = tokens * t.vocab * (act + 4 + 4)
    tower = 0
    if train_vision:
        v = c.vision
        views = -(-tokens // v.tokens)
        per_view_token = act * (6 * v.hidden + 2 * v.intermediate)
        tower = views * v.tokens * v.layers * per_view_token
    return decoder + head + tower


def memory_plan(model, mode, world, cfg, train_vision, bf16):
    """The MemoryPlan per GPU of training `model` (its shapes: any device, LoRA adapters added or
    not) in `mode` (full, lora or fsdp) over `world` processes, with cfg's --lora, --lora-targets,
    --budget and --grad-ckpt. Full: fp32 weights, gradients and AdamW moments of the trained ones
    (the tower only with train_vision), and under bf16 autocast the bf16 copies of the trained
    matrices it keeps for the backward pass. LoRA: the same for the adapters; the targeted frozen
    weights in bf16 (with bf16), the rest fp32. FSDP: the fp32 state divided by world, plus the
    bf16 weights of the units gathered at once (the root's, two blocks'). DDP (world > 1, not FSDP)
    keeps its gradient buckets: one more copy of the gradients."""
    params = {name: p.numel() for name, p in model.named_parameters() if ".lora_" not in name}
    everything = sum(params.values())
    trained = sum(n for name, n in params.items()
                  if train_vision or not name.startswith("vision."))
    # the decoder's, the projector's and the head's matrices (the embedding is a lookup)
    in_blocks = [p for name, p in model.named_parameters() if ".lora_" not in name
                 and p.dim() > 1 and name.startswith(("decoder.layers", "projector"))]
    matrices = sum(p.numel() for p in in_blocks) + model.lm_head.weight.numel()
    act = 2 if bf16 else 4
    activations = activation_bytes(model.config, cfg.budget, cfg.grad_ckpt, act, train_vision)
    # ---- LoRA: fp32 adapters; the targeted weights in bf16 with bf16; the head copied to bf16
    if mode == "lora":
        sites = linear_sites(model, cfg.lora_targets.split(","))
        adapters = sum(cfg.lora * (i + o) for i, o in sites)
        targeted = sum(i * o for i, o in sites)
        weights = 4 * (everything - targeted) + act * targeted + 4 * adapters
        buckets = 4 * adapters if world > 1 else 0
        head = 2 * model.lm_head.weight.numel() if bf16 else 0
        return MemoryPlan(weights, 4 * adapters + buckets, 8 * adapters, activations + head)
    # ---- full and FSDP: under autocast, bf16 copies of the trained matrices live until backward
    copies = 2 * matrices if bf16 else 0
    if mode == "full":
        buckets = 4 * trained if world > 1 else 0
        return MemoryPlan(4 * everything, 4 * trained + buckets, 8 * trained, activations + copies)
    blocks = [sum(p.numel() for p in b.parameters()) for b in [*model.decoder.layers,
                                                              *model.vision.layers]]
    root = everything - sum(blocks)
    gathered = act * (root + 2 * max(blocks))
    return MemoryPlan(-(-4 * everything // world) + gathered, -(-4 * trained // world),
                      -(-8 * trained // world), activations)


def plan_table(plan, mode, world):
    """The plan as the lines of the log: GiB per row, and the total."""
    rows = [("weights", plan.weights), ("gradients", plan.gradients),
            ("optimizer (AdamW)", plan.optimizer), ("activations (estimate)", plan.activations),
            ("total", plan.total)]
    lines = [f"memory plan per GPU, {mode}, {world} process{'es' if world > 1 else ''}:"]
    for label, size in rows:
        lines.append(f"  {label:<24}{size / GIB:8.2f} GiB")
    return "\n".join(lines)


def fewest_gpus(model, cfg, train_vision, bf16, capacity, most=1024):
    """The fewest processes over which FSDP fits in `capacity` bytes per GPU, or None."""
    for world in range(2, most + 1):
        if memory_plan(model, "fsdp", world, cfg, train_vision, bf16).total <= capacity:
            return world
    return None


def refusal(model, cfg, world, train_vision, bf16, capacity, where):
    """The one-line InputError message for a plan that does not fit in `capacity` bytes: what it
    needs, and the fix (--lora, or --fsdp over enough GPUs)."""
    mode = run_mode(cfg)
    need = memory_plan(model, mode, world, cfg, train_vision, bf16).total
    fixes = []
    # the release's rank when none is given
    lora_cfg = replace(cfg, lora=cfg.lora or 64)
    lora = memory_plan(model, "lora", 1, lora_cfg, train_vision, bf16).total
    if mode != "lora" and lora <= capacity:
        fixes.append(f"--lora ({lora / GIB:.1f} GiB)")
    gpus = fewest_gpus(model, cfg, train_vision, bf16, capacity)
    if gpus is not None:
        fixes.append(f"--fsdp with >= {gpus} GPUs")
    fix = "use " + " or ".join(fixes) if fixes else "no mode fits: use a GPU with more memory"
    return (f"the memory plan ({mode}, {world} process{'es' if world > 1 else ''}) needs "
            f"{need / GIB:.1f} GiB per GPU, more than the {capacity / GIB:.1f} GiB of {where}: "
            f"{fix}; --grad-ckpt or a smaller --budget lowers the activations")


def check_memory(model, cfg, device, log):
    """Print the memory plan of the run (the model still on the CPU); on a GPU, refuse
    (InputError) a run it says cannot fit in the GPU's memory, before anything is put there. On
    the CPU nothing is refused: RAM is shared with the loader processes, and swap."""
    world = dist.get_world_size()
    train_vision = trains_vision(cfg)
    bf16 = uses_bf16(cfg, device.type == "cuda")
    mode = run_mode(cfg)
    plan = memory_plan(model, mode, world, cfg, train_vision, bf16)
    log(plan_table(plan, mode, world), flush=True)
    if device.type != "cuda":
        return
    capacity = torch.cuda.get_device_properties(device).total_memory
    if plan.total > capacity:
        where = torch.cuda.get_device_name(device)
        raise InputError(refusal(model, cfg, world, train_vision, bf16, capacity, where))


# ==== Checkpoints: the llava-hf layout, the hub's key names

def hf_config(c):
    """interleave's ModelConfig -> llava-hf config.json, as interleave.config_from_dict and
    transformers read it."""
    text = {"model_type": "qwen2", "hidden_act": "silu"}
    text.update({hf: getattr(c.text, ours) for ours, hf in HF_NAMES["text"].items()})
    vision = {"model_type": "siglip_vision_model", "vision_use_head": False}
    vision.update({hf: getattr(c.vision, ours) for ours, hf in HF_NAMES["vision"].items()})
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "ignore_index": IGNORE, "image_token_index": c.image_token_id,
            "projector_hidden_act": "gelu", "multimodal_projector_bias": c.projector_bias,
            "vision_feature_layer": c.vision.feature_layer,
            "vision_feature_select_strategy": "full", "image_grid_pinpoints": c.grid_pinpoints,
            "tie_word_embeddings": c.text.tie_embeddings, "torch_dtype": "float32",
            "text_config": text, "vision_config": vision}


def hub_key(ours):
    """Our module path -> the hub's llava-hf name: the inverse of interleave.our_key (checked)."""
    head, _, rest = ours.partition(".")
    # SigLIP nests embeddings., encoder. and mlp.
    if head == "vision" and rest.startswith(("patch_", "position_")):
        rest = "embeddings." + rest
    if head == "vision" and rest.startswith("layers."):
        rest = "encoder." + rest.replace(".fc", ".mlp.fc")
    # Qwen2 nests mlp.
    rest = re.sub(r"\.(gate|up|down)_proj", r".mlp.\1_proj", rest)
    # image_newline stays a top-level key
    key = HUB_PREFIXES[head] + rest if head in HUB_PREFIXES else ours
    assert interleave.our_key(key) == ours, (ours, key)
    return key


def atomic(path, write):
    """write(a temporary name), then rename: a reader sees the old file or the new one, never half
    of one."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path + ".tmp")   # left over from a crash
    write(path + ".tmp")
    os.replace(path + ".tmp", path)


def write_model(folder, model, tokenizer, trainer_state=None, weights=True):
    """config.json, model.safetensors (fp32; LoRA adapters merged in; not with weights=False),
    tokenizer.json, generation_config.json, each written atomically; a LoRA model's adapters alone
    in adapter/ (write_adapter); the trainer state too when given one (write_trainer_state)."""
    os.makedirs(folder, exist_ok=True)
    # tied embeddings: then the hub's files have no lm_head (docs/MODEL.md §1)
    tied = model.config.text.tie_embeddings
    if weights:
        tensors = {}
        for k, t in merged_state_dict(model).items():
            if not (tied and k == "lm_head.weight"):
                tensors[hub_key(k)] = t.detach().float().contiguous().cpu()
        atomic(os.path.join(folder, "model.safetensors"),
               lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    stops = [tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
    generation = {"eos_token_id": stops, "pad_token_id": stops[1], "do_sample": False,
                  "max_new_tokens": 64}
    configs = {"config.json": hf_config(model.config), "generation_config.json": generation}
    for name, obj in configs.items():
        text = json.dumps(obj, indent=2)
        atomic(os.path.join(folder, name), lambda tmp: pathlib.Path(tmp).write_text(text))
    atomic(os.path.join(folder, "tokenizer.json"), tokenizer.save)
    write_adapter(os.path.join(folder, ADAPTER), model)
    if trainer_state is not None:
        write_trainer_state(folder, trainer_state)


# The trainer state is kept without pickle: unpickling a file runs any code it names, and a run
# folder may be shared or writable by others. Its tensors go into a safetensors file, the rest
# into JSON; a trainer_state.pt an older train.py left is never read.
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"


def trainer_state(progress, optimizer, cfg, device, cuda):
    """What --resume needs besides the model: the progress (step, data position, loss history,
    evaluations), the optimizer's state, the config, the random generators'."""
    return {"progress": progress, "optimizer": optimizer.state_dict(), "config": asdict(cfg),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if cuda else None}


def write_trainer_state(folder, state):
    """A trainer_state (its "progress": (step, data position, loss history, evaluations),
    "optimizer": a state_dict, "rng", "cuda_rng", "config") as STATE_TENSORS (the optimizer's
    moments and steps, optimizer.<parameter index>.<name>; the random generators) and STATE_JSON
    (the rest: numbers, lists, the optimizer's settings), each atomically."""
    step, position, history, evals = state["progress"]
    tensors = {"rng": state["rng"]}
    if state["cuda_rng"] is not None:
        tensors["cuda_rng"] = state["cuda_rng"]
    for index, values in state["optimizer"]["state"].items():
        for name, value in values.items():
            tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
    rest = {"step": step, "position": position, "history": history, "evals": evals,
            "param_groups": state["optimizer"]["param_groups"], "config": state["config"]}
    text = json.dumps(rest, indent=1)
    atomic(os.path.join(folder, STATE_TENSORS), lambda tmp: save_file(tensors, tmp))
    atomic(os.path.join(folder, STATE_JSON), lambda tmp: pathlib.Path(tmp).write_text(text))


def read_trainer_state(folder):
    """The trainer_state that write_trainer_state wrote into `folder`, as it was given. Raises
    CheckpointError, naming the file, for one that is missing or malformed."""
    try:
        rest = json.loads(pathlib.Path(folder, STATE_JSON).read_text())
        tensors = load_file(os.path.join(folder, STATE_TENSORS))
        history = [(int(step), float(loss)) for step, loss in rest["history"]]
        progress = (int(rest["step"]), int(rest["position"]), history, list(rest["evals"]))
        moments = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                moments.setdefault(int(index), {})[name] = value
        # JSON has no tuples: AdamW's betas come back as one
        groups = [{k: tuple(v) if k == "betas" else v for k, v in group.items()}
                  for group in rest["param_groups"]]
        state = {"progress": progress, "optimizer": {"state": moments, "param_groups": groups},
                 "rng": tensors["rng"], "cuda_rng": tensors.get("cuda_rng"),
                 "config": rest["config"]}
    except FileNotFoundError as e:
        raise CheckpointError(f"{e.filename} is missing: --resume reads the trainer state this "
                              "train.py writes (never an older one's pickled trainer_state.pt); "
                              "fine-tune from the folder with --init instead") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as e:
        raise CheckpointError(f"the trainer state in {folder} is malformed ({e!r:.200}); resume "
                              "from another checkpoint, or fine-tune from it with --init") from None
    return state


def save_checkpoint(out, step, model, tokenizer, trainer_state):
    """OUT/step-N is written whole under a temporary name, then renamed, and only then does the link
    OUT/latest move to it: a crash at any moment leaves the last good checkpoint intact. Of the
    checkpoints of lower steps (this run's, or the one it resumed from) the newest is kept; a
    higher one is another run's and is never touched."""
    name = f"step-{step:06d}"
    tmp = os.path.join(out, f".{name}.tmp")
    write_model(tmp, model, tokenizer, trainer_state)
    publish_checkpoint(out, step, tmp)


def publish_checkpoint(out, step, tmp):
    """Rename the complete checkpoint folder `tmp` to OUT/step-N, move OUT/latest to it, delete all
    but the newest older one (save_checkpoint)."""
    name = f"step-{step:06d}"
    shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    os.replace(tmp, os.path.join(out, name))
    atomic(os.path.join(out, "latest"), lambda link: os.symlink(name, link))
    found = checkpoints(out)
    older = sorted(s for s in found if s < step)
    for old in older[:-1]:
        shutil.rmtree(os.path.join(out, found[old]))


# ==== Loss, FLOPs, evaluation, loss curve

class WithLoss(torch.nn.Module):
    """The model and its summed loss in one forward, for DDP. The head runs only where there is a
    label: the logits of every position of a 16k-token pack, with the releases' 152k vocabulary,
    would outweigh the 0.5B model."""

    def __init__(self, model, act_dtype=torch.float32):
        super().__init__()
        self.model = model
        self.act_dtype = act_dtype

    def forward(self, ids, labels, pixels, sizes, positions, cu_seqlens=None):
        m = self.model
        # In bf16 the residual stream is bf16 too, as in transformers' Qwen2 in bf16: the rotary
        # tables follow its dtype, so q, k, v share one dtype.
        x = m.embed(ids, pixels, sizes).to(self.act_dtype)   # (1, T, hidden)
        # position t predicts token t + 1
        hidden = m.decoder(x, positions, None, 0, cu_seqlens)[0, :-1]   # (T - 1, hidden)
        keep = labels[1:] != IGNORE
        logits = m.lm_head(hidden[keep]).float()   # (labelled, vocab)
        return F.cross_entropy(logits, labels[1:][keep], reduction="sum")


def wrap_model(cfg, model, train_vision, device, bf16, world):
    """(The model with its loss, as this process runs it; the trained parameters; their AdamW):
    FSDP2 with --fsdp (which replaces each parameter by its slice), else DDP over several
    processes."""
    params = trained_parameters(model, train_vision, cfg.grad_ckpt)
    params = add_lora(model, cfg, params, bf16_base=device.type == "cuda" and bf16)
    dtype = torch.bfloat16 if bf16 else torch.float32
    wrapped = EveryUnitWithLoss(model, dtype) if cfg.fsdp else WithLoss(model, dtype)
    if cfg.fsdp:
        params = shard_model(wrapped, device, bf16)
    # DDP: some parameters may get no gradient: image_newline in a step without multi-patch
    elif world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(wrapped, find_unused_parameters=True)
    return wrapped, params, make_optimizer(params, cfg, device.type == "cuda")


def forward_backward(wrapped, packs, device, world, bf16):
    """Accumulate, pack by pack, the gradients of the step's mean loss per labelled token over all
    processes' packs; return that mean loss and the count of labelled tokens (each the same on
    every process)."""
    # the labelled tokens of the whole step, over all processes
    labelled = sum(int((p.labels != IGNORE).sum()) for p in packs)
    count = torch.tensor([float(labelled)], device=device)
    total = torch.zeros(1, device=device)
    dist.all_reduce(count)
    for i, p in enumerate(packs):
        # gradient accumulation: DDP syncs the gradients at the last pack only
        last = i == len(packs) - 1
        ddp = isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
        sync = wrapped.no_sync() if ddp and not last else contextlib.nullcontext()
        with sync, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            ids = p.input_ids[None].to(device)   # (1, T)
            labels = p.labels.to(device)
            pixels = None if p.pixel_values is None else p.pixel_values.to(device)
            positions = p.position_ids[None].to(device)   # (1, T)
            loss = wrapped(ids, labels, pixels, p.image_sizes, positions, p.cu_seqlens.to(device))
        # the mean over all tokens of the step; DDP and FSDP divide the gradients by world: multiply
        (loss * world / count.clamp(min=1)).backward()
        total += loss.detach()
    dist.all_reduce(total)
    return (total / count.clamp(min=1)).item(), int(count.item())


def step_flops(model, packs, train_vision):
    """Model FLOPs of a step: 2 per multiply-add forward, twice that backward; recomputation is not
    counted."""
    c = model.config

    def matrix_weights(module):
        """The weights of the module's matrices (multiply-adds per token), not of its vectors."""
        return sum(p.numel() for p in module.parameters() if p.dim() > 1)

    views = sum(p.pixel_values.shape[0] for p in packs if p.pixel_values is not None)
    cu = [p.cu_seqlens.tolist() for p in packs]
    # the decoder: its matrices but the embedding (a lookup), causal attention per sample, the head
    tokens = sum(b[-1] for b in cu)
    decoder = 6 * (matrix_weights(model.decoder) - c.text.vocab * c.text.hidden) * tokens
    pairs = sum(t * (t + 1) // 2 for b in cu for t in np.diff(b))
    attention = 12 * c.text.layers * c.text.heads * c.text.head_dim * pairs
    labelled = sum(int((p.labels != IGNORE).sum()) for p in packs)
    text = decoder + attention + 6 * c.text.hidden * c.text.vocab * labelled
    # the tower: forward only while frozen
    s = c.vision.tokens
    matmuls = matrix_weights(model.vision) - model.vision.position_embedding.weight.numel()
    per_view = 2 * matmuls * s + 4 * len(model.vision.layers) * c.vision.hidden * s * s
    tower = (1 + 2 * train_vision) * views * per_view
    return int(text + tower + 6 * views * s * matrix_weights(model.projector))


@dataclass
class Throughput:
    """What the steps since the last log line did, for its speed, MFU, packing and ETA."""
    seconds: float = 0.0
    tokens: float = 0.0   # over all processes
    flops: float = 0.0    # over all processes
    packed: float = 0.0   # this process's tokens in packs
    room: float = 0.0     # this process's packs x --budget
    steps: float = 0.0

    def add(self, seconds, packs, flops, world, budget):
        """Count a step: its `seconds`, this process's `packs`, their `flops` (step_flops)."""
        real = sum(len(p.input_ids) for p in packs)
        self.seconds += seconds
        self.tokens += real * world
        self.flops += flops * world
        self.packed += real
        self.room += len(packs) * budget
        self.steps += 1

    def summary(self, device, world, steps_left):
        """'tok/s | MFU | packing | ETA' of a log line; MFU needs the GPU's peak (n/a on a CPU)."""
        peak = peak_tflops(device) if device.type == "cuda" else None
        mfu = "n/a"
        if peak:
            mfu = f"{100 * self.flops / self.seconds / (peak * 1e12 * world):.1f}%"
        eta = self.seconds / self.steps * steps_left / 60
        return (f"{self.tokens / self.seconds:,.0f} tok/s | MFU {mfu} | "
                f"packing {100 * self.packed / self.room:.1f}% | ETA {eta:.1f} min")


def peak_tflops(device):
    """The bf16 dense peak of the GPU `device` from PEAK_TFLOPS, or None for a GPU not listed."""
    name = torch.cuda.get_device_name(device)
    return next((tflops for gpu, tflops in PEAK_TFLOPS.items() if gpu in name), None)


def cut_at_stop(ids, stops):
    """The token ids before the first stop token or IGNORE label."""
    end = next((i for i, t in enumerate(ids) if t in stops or t == IGNORE), len(ids))
    return ids[:end]


def unscorable(sample, context):
    """Why a held-out sample cannot be scored (no reply; too long for the model's `context` with
    the 8 tokens an answer may run past its reply), or None."""
    if (sample.labels == IGNORE).all():
        return "no reply to score"
    if len(sample.input_ids) + 8 > context:
        return f"{len(sample.input_ids)} tokens, too long for the model's {context} positions"
    return None


def task_of(record):
    """The record's metadata.task if that is a string, else "all"."""
    metadata = record.get("metadata")
    task = metadata.get("task") if isinstance(metadata, dict) else None
    return task if isinstance(task, str) else "all"


@torch.no_grad()
def evaluate(model, records, cfg, tokenizer, skip, device, step, log):
    """Held-out loss on the replies, and exact match of the greedy answer to the first reply, per
    metadata.task (task_of). The labels follow the replies rule, whatever --loss-on: they mark
    where the replies are. An unusable record goes to skip(why, ("val", its index))."""
    model.eval()
    stops = [tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
    loss_sum = 0.0
    n_tokens = 0
    tasks = {}   # task -> [whether each answer matched]
    for i, record in enumerate(records):
        sample, why = to_sample(record, cfg, tokenizer, model.config, loss_on="replies")
        why = why or unscorable(sample, model.config.text.max_positions)
        if why:
            skip(f"held-out record {i + 1}: {why}", ("val", i))
            continue
        ids = sample.input_ids.to(device)
        labels = sample.labels.to(device)
        pixels = None if sample.pixel_values is None else sample.pixel_values.to(device)
        positions = torch.arange(len(ids), device=device)[None]   # (1, T)
        loss_sum += WithLoss(model)(ids[None], labels, pixels, sample.image_sizes, positions).item()
        n_tokens += int((labels != IGNORE).sum())
        # the prompt ends where the first reply starts
        first = int((labels != IGNORE).nonzero()[0])
        reply = cut_at_stop(labels[first:].tolist(), stops)
        # short answers: capturing a CUDA graph would cost more than it saves
        new = model.generate(ids[None, :first], pixels, sample.image_sizes,
                             max_new_tokens=len(reply) + 8, stop_ids=stops, cuda_graph=False)
        new = new[0].tolist()
        task = task_of(record)
        answer = tokenizer.decode(cut_at_stop(new, stops)).strip()
        tasks.setdefault(task, []).append(answer == tokenizer.decode(reply).strip())
    model.train()
    accuracy = {task: sum(hits) / len(hits) for task, hits in sorted(tasks.items())}
    loss = loss_sum / max(1, n_tokens)
    log(f"eval at step {step}: held-out loss {loss:.4f} | exact match "
        + ", ".join(f"{task} {100 * a:.1f}%" for task, a in accuracy.items()), flush=True)
    return {"step": step, "loss": loss, "accuracy": accuracy, "records": len(records)}


def plot(history, evals, path):
    """loss.png, log scale: the training loss of every step in blue, held-out evaluations in red."""
    w, h = 720, 420
    pad = 50
    last = history[-1][0]
    values = [loss for _, loss in history] + [e["loss"] for e in evals]
    # a loss may round to 0
    lo = math.log(max(min(values), 1e-6))
    hi = math.log(max(max(values), 1e-6))

    def xy(step, loss):
        """The pixel of (step, loss) in the frame."""
        x = pad + (w - 2 * pad) * step / last
        y = h - pad - (h - 2 * pad) * (math.log(max(loss, 1e-6)) - lo) / (hi - lo or 1)
        return x, y

    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((pad, pad, w - pad, h - pad), outline="black")
    draw.line([xy(s, v) for s, v in history], fill=(40, 90, 200))
    for e in evals:
        x, y = xy(e["step"], e["loss"])
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(210, 40, 40))
    title = f"loss {math.exp(lo):.3g}..{math.exp(hi):.3g}, log scale, {last} steps"
    draw.text((pad, 20), title + ": training blue, held-out red", fill="black")
    atomic(path, lambda tmp: image.save(tmp, format="PNG"))


# ==== Sharding: FSDP2 over the torchrun processes (--fsdp)
#
# DDP keeps the whole model, its gradients and AdamW's two moments on every GPU: 16 bytes a weight,
# 115 GB for the 7B release. FSDP2 (fully_shard) keeps a 1/world slice of each on each process:
# every parameter becomes a DTensor, cut along its first dimension. A unit's weights (a decoder
# block, a vision block; for the root, all the rest: embeddings, projector, head, norms) are
# all-gathered just before the unit runs, freed after it, gathered again for its backward, and its
# gradients are reduce-scattered: each process receives the average of its slice, over all
# processes, and AdamW updates that slice only.
#
# A gather is a collective: every process must join it, in the same order. So every process runs
# every unit in every forward, and as many packs as the process with the most. A pack without an
# image runs the tower on one blank view, and image_newline joins every loss, both times 0 (the
# release's trainer does the same under its ZeRO-3 sharding); in a step where no process had an
# image (or a multi-patch one) those zero gradients are dropped again, as one process never has
# them, so AdamW leaves those weights alone. The loss and the data order are DDP's.
#
# Checkpoints: each process writes its slices of the weights and of AdamW's moments into
# step-N/shards (torch.distributed.checkpoint); the rest of the trainer state is JSON as for DDP.
# The folder is renamed to step-N only when every process has written its part.

SHARDS = "shards"
AS_WRITTEN = "with the options it was written with"
# what torch.distributed.checkpoint pickles into shards/.metadata (its table of contents)
DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath"},
}


class EveryUnitWithLoss(WithLoss):
    """WithLoss, running the tower and image_newline in every forward (see above): the same loss,
    the same gradients."""

    def forward(self, ids, labels, pixels, sizes, positions, cu_seqlens=None):
        m = self.model
        unused = torch.zeros((), device=ids.device)
        # before the decoder, where embed runs the tower: the gathers keep their order
        if pixels is None:
            size = m.config.vision.image_size
            blank = torch.zeros(1, 3, size, size, device=ids.device)
            unused = unused + m.projector(m.vision(blank)).sum()
        if m.config.has_image_newline:
            unused = unused + m.image_newline.sum()
        loss = super().forward(ids, labels, pixels, sizes, positions, cu_seqlens)
        return loss + 0 * unused


def shard_model(wrapped, device, bf16):
    """Shard `wrapped` (an EveryUnitWithLoss) in place: each vision and each decoder block a unit,
    then the root; return its trained parameters, now DTensors. bf16: the gathered weights are
    bf16, the gradients are reduced in fp32 (the weights' slices and AdamW stay fp32)."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy()
    if bf16:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = wrapped.model
    for block in [*model.vision.layers, *model.decoder.layers]:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(wrapped, mesh=mesh, mp_policy=policy)
    return [p for p in model.parameters() if p.requires_grad]


def even_packs(packs, device):
    """`packs`, then empty ones up to the count of the process with the most."""
    most = torch.tensor([len(packs)], device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return packs + [empty_pack() for _ in range(int(most) - len(packs))]


def sharded_forward_backward(wrapped, packs, device, world, bf16):
    """forward_backward with --fsdp: as many packs as the process with the most; then the zero
    gradients of what no process used dropped."""
    loss, labelled = forward_backward(wrapped, even_packs(packs, device), device, world, bf16)
    drop_unused_gradients(wrapped.model, packs, device)
    return loss, labelled


def drop_unused_gradients(model, packs, device):
    """After the backward: None again for the zero gradients of what no process used in the step
    (the tower and projector with no image, image_newline with no multi-patch image)."""
    images = sum(p.pixel_values is not None for p in packs)
    multipatch = sum(size is not None for p in packs for size in p.image_sizes)
    used = torch.tensor([images, multipatch], device=device)
    dist.all_reduce(used)
    unused = []
    if not used[0]:
        unused += [*model.vision.parameters(), *model.projector.parameters()]
    if not used[1] and model.config.has_image_newline:
        unused.append(model.image_newline)
    for p in unused:
        p.grad = None


def gathered_model(model, cfg, rank, device):
    """Every process: `model` unsharded; with --fsdp, its weights gathered into rank 0's CPU
    memory and loaded into a plain model on `device` there (None on the other ranks)."""
    if not cfg.fsdp:
        return model
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    if rank != 0:
        return None
    with torch.device("meta"):
        plain = interleave.LlavaInterleave(model.config)
    plain.load_state_dict(weights, assign=True)
    if model.config.text.tie_embeddings:
        plain.lm_head.weight = plain.decoder.embed_tokens.weight
    attn = attention_impl(cfg, device.type == "cuda")
    return plain.to(device).train().set_attention(attn)


def save_sharded_checkpoint(out, step, wrapped, optimizer, tokenizer, state, rank):
    """Every process: OUT/step-N as save_checkpoint writes it, but the weights and AdamW's moments
    in shards/, each process its slices; AdamW's settings (by parameter name) in the JSON."""
    tmp = os.path.join(out, f".step-{step:06d}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)   # left over from a crash
    dist.barrier()
    weights, moments = get_state_dict(wrapped.model, optimizer)
    dcp.save({"model": weights, "optimizer": moments["state"]},
             checkpoint_id=os.path.join(tmp, SHARDS))
    if rank == 0:
        state["optimizer"] = {"state": {}, "param_groups": moments["param_groups"]}
        write_model(tmp, wrapped.model, tokenizer, state, weights=False)
    # every process's slices are written: only now may the folder become a checkpoint
    dist.barrier()
    if rank == 0:
        publish_checkpoint(out, step, tmp)


class ShardReader(dcp.FileSystemReader):
    """torch.distributed.checkpoint's reader of a shards/ folder, but its table of contents, a
    pickle (which could name any function to run), is read by an unpickler that builds only what
    that table holds (DCP_CLASSES); the tensors it reads as torch.load(weights_only=True)."""

    def read_metadata(self, *args, **kwargs):
        path = os.path.join(self.path, ".metadata")
        try:
            with open(path, "rb") as f:
                metadata = MetadataUnpickler(f).load()
        except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
            raise CheckpointError(f"cannot read {path} ({e!r:.200}): resume from another "
                                  "checkpoint, whose shards/ folder is whole") from None
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler that refuses every class or function outside DCP_CLASSES, and torch's
    dtypes."""

    def find_class(self, module, name):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if dtype or name in DCP_CLASSES.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not in a checkpoint's table of contents")


def load_shards(folder, wrapped, optimizer, param_groups):
    """Every process: its slices of the weights and AdamW's moments from `folder`/shards, and
    AdamW's settings `param_groups` (from the trainer state's JSON)."""
    weights, moments = get_state_dict(wrapped.model, optimizer)
    shards = {"model": weights, "optimizer": moments["state"]}
    try:
        dcp.load(shards, storage_reader=ShardReader(os.path.join(folder, SHARDS)))
        moments = {"state": shards["optimizer"], "param_groups": param_groups}
        set_state_dict(wrapped.model, optimizer, model_state_dict=shards["model"],
                       optim_state_dict=moments)
    except CheckpointException as e:
        # DCP's error (a BaseException) holds each process's own: the first one says enough
        first, _ = next(iter(e.failures.values()))
        raise CheckpointError(f"the shards in {folder} cannot be read ({first!r:.300}); resume "
                              f"from another checkpoint, {AS_WRITTEN}") from None
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"the shards in {folder} do not fit this run ({e!r:.300}); resume "
                              f"from another checkpoint, {AS_WRITTEN}") from None


def check_sharding_matches(folder, fsdp):
    """Raise InputError when --fsdp and the checkpoint `folder` to resume from disagree."""
    sharded = os.path.isdir(os.path.join(folder, SHARDS))
    if sharded and not fsdp:
        raise InputError(f"{folder} was written with --fsdp (its weights are in {SHARDS}/): "
                         "resume with --fsdp")
    if fsdp and not sharded:
        raise InputError(f"{folder} was written without --fsdp (it has no {SHARDS}/): resume "
                         "without --fsdp, or fine-tune from it with --init and --fsdp")


def unfilled_model(folder):
    """The model of a sharded checkpoint `folder`, shaped by its config.json and its shards' table
    of contents (how many vision layers; image_newline or not), with uninitialized weights."""
    config = interleave.read_config(folder)
    stored = ShardReader(os.path.join(folder, SHARDS)).read_metadata().state_dict_metadata
    # keys such as model.vision.layers.7.fc1.weight
    layers = {k.split(".")[3] for k in stored if k.startswith("model.vision.layers.")}
    config.vision.layers = len(layers)
    config.has_image_newline = "model.image_newline" in stored
    with torch.device("meta"):
        model = interleave.LlavaInterleave(config)
    model = model.to_empty(device="cpu")
    if config.text.tie_embeddings:
        model.lm_head.weight = model.decoder.embed_tokens.weight
    return model


# ==== The run

def main(argv=None):
    """The command line (argv, default sys.argv) -> Config -> train, in a process group of its own
    unless torchrun made one."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # one option per Config field; a bool is a --flag / --no-flag pair
    for f in fields(Config):
        kind = {"action": argparse.BooleanOptionalAction} if f.type is bool else {"type": type(f.default)}
        p.add_argument("--" + f.name.replace("_", "-"), default=f.default, help=f.metadata["help"],
                       **kind)
    cfg = Config(**vars(p.parse_args(argv)))
    # bad options and a used run folder are refused before anything is built
    try:
        check_options(cfg)
        check_run_folder(cfg)
    except InputError as e:
        sys.exit(f"error: {e}")
    cuda = torch.cuda.is_available()
    # torchrun sets RANK; a lone process gets a (gloo) process group of its own: one code path
    single = {} if "RANK" in os.environ else dict(store=dist.HashStore(), rank=0, world_size=1)
    dist.init_process_group("nccl" if cuda and not single else "gloo", **single)
    try:
        return train(cfg, cuda, dist.get_rank(), dist.get_world_size())
    except (InputError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    finally:
        dist.destroy_process_group()


def no_log(*args, **kwargs):
    """The log of every process but rank 0: nothing."""


def stop_if_not_finite(step, loss, grad_norm, out):
    """Exit before an update that would spoil the weights: on a NaN or infinite loss or gradient."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    latest = os.path.join(out, "latest")
    last_good = os.path.realpath(latest) if os.path.exists(latest) else "none yet"
    sys.exit(f"step {step + 1}: loss {loss}, gradient norm {grad_norm}: stopping; "
             f"the last good checkpoint is {last_good}")


def stop_if_nothing_to_learn(step, unusable, records, skip, budget):
    """Exit when the last `unusable` records drawn, all of them or 100, gave no token to learn from
    (each skipped, or cut by --budget before its reply): the loss would read 0 and nothing learn."""
    if unusable < min(records, 100):
        return
    sys.exit(f"step {step + 1}: none of the last {unusable} records drawn has a reply token to "
             f"learn from (the last reason: {skip.last}); fix the records, or raise --budget "
             f"{budget} if it cuts them")


@contextlib.contextmanager
def loader_processes(run):
    """A pool of loader processes (threads would hold the GIL the model's code needs) for `run`
    (see start_loader), shut down when the run ends or stops, its queued work dropped."""
    pool = ProcessPoolExecutor(min(8, os.cpu_count()), initializer=start_loader, initargs=(run,))
    try:
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)


def finish(cfg, model, tokenizer, val, history, evals, skip, device, step, log, rank):
    """The end of the run (every process: --fsdp gathers the model on rank 0; then rank 0 alone):
    the exported model first, as the last checkpoint already is, so that nothing after can lose
    it; then the evaluation on every held-out record, the loss curve."""
    # what the memory plan, printed before step 1, is checked against on a GPU
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / GIB
        log(f"peak GPU memory allocated while training: {peak:.2f} GiB")
    model = gathered_model(model, cfg, rank, device)
    if rank != 0:
        return
    if cfg.export:
        write_model(cfg.export, model, tokenizer)
    if val:
        evals.append(evaluate(model, val, cfg, tokenizer, skip, device, step, log))
    plot(history, evals, os.path.join(cfg.out, "loss.png"))


def train(cfg, cuda, rank, world):
    """One process's part of the run (a single process is rank 0 of 1); returns its results."""
    # ---- set-up: device, log (rank 0 only), the counter of skipped records
    started = time.time()
    log = print if rank == 0 else no_log
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    bf16 = uses_bf16(cfg, cuda)
    skip = SkippedRecords()

    # ---- data, tokenizer, model, optimizer; a checkpoint (or its shape) keeps its tower frozen
    records, val = load_records(cfg, rank, skip)
    tokenizer = build_tokenizer(cfg, records)
    check_budget(cfg.budget, tokenizer)
    model = build_model(cfg, tokenizer, device, cuda, log)
    train_vision = trains_vision(cfg)
    wrapped, params, optimizer = wrap_model(cfg, model, train_vision, device, bf16, world)
    # ---- resume (or start): step, data position, curves, optimizer moments, random generators
    step, position, history, evals = resume(cfg, wrapped, optimizer, device, cuda)
    weights = sum(p.numel() for p in params)
    log(f"{weights:,} trained weights, {len(records)} records, {world}x {device}, step {step}")
    # ---- the loop; loader processes prepare the samples
    meter = Throughput()
    unusable = 0   # records drawn since a step last had a token to learn from
    with loader_processes((cfg, tokenizer, model.config)) as pool:
        upcoming = submit_batch(pool, records, cfg, position, rank, world)
        while step < cfg.steps:
            # ---- batch: this step's samples, prepared while the last step trained; submit the next
            lr = get_lr(step, cfg)
            t0 = time.time()
            samples = take_batch(upcoming, skip)
            position += cfg.batch
            if step + 1 < cfg.steps:
                upcoming = submit_batch(pool, records, cfg, position, rank, world)
            packs = pack_batch(samples, cfg.budget)
            # ---- forward and backward, then clip the gradient norm at 1
            backward = sharded_forward_backward if cfg.fsdp else forward_backward
            loss, labelled = backward(wrapped, packs, device, world, bf16)
            unusable = 0 if labelled else unusable + cfg.batch
            stop_if_nothing_to_learn(step, unusable, len(records), skip, cfg.budget)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            stop_if_not_finite(step, loss, grad_norm, cfg.out)
            # ---- step
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            history.append((step, loss))
            # ---- log: every 10 steps, the throughput since the last log line
            meter.add(time.time() - t0, packs, step_flops(model, packs, train_vision), world,
                      cfg.budget)
            if step % 10 == 0 or step == cfg.steps:
                speed = meter.summary(device, world, cfg.steps - step)
                log(f"step {step}/{cfg.steps} | loss {loss:.4f} | lr {lr:.2e} | "
                    f"grad norm {float(grad_norm):.2f} | {speed} | skipped {len(skip.reasons)}", flush=True)
                meter = Throughput()
            # ---- evaluate on 200 held-out records (rank 0); on all of them after the last step
            evaluating = cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps
            if val and evaluating:
                whole = gathered_model(model, cfg, rank, device)
                if rank == 0:
                    evals.append(evaluate(whole, val[:200], cfg, tokenizer, skip, device, step, log))
            # ---- checkpoint (rank 0, or with --fsdp each its shards): what resume reads back
            if cfg.save_every and (step % cfg.save_every == 0 or step == cfg.steps):
                state = trainer_state((step, position, history, evals), optimizer, cfg, device, cuda)
                if cfg.fsdp:
                    save_sharded_checkpoint(cfg.out, step, wrapped, optimizer, tokenizer, state,
                                            rank)
                elif rank == 0:
                    save_checkpoint(cfg.out, step, model, tokenizer, state)
            dist.barrier()

    # ---- the end (rank 0): the exported model, then evaluation on every held-out record
    finish(cfg, model, tokenizer, val, history, evals, skip, device, step, log, rank)
    skipped = len(skip.reasons)
    log(f"done: {step} steps in {(time.time() - started) / 60:.1f} min, {skipped} records skipped")
    return {"model": model, "tokenizer": tokenizer, "history": history, "evals": evals,
            "skipped": skipped}


if __name__ == "__main__":
    main()
