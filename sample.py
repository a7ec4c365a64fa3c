"""Ask LLaVA-NeXT-Interleave about several images, video frames, the views of a 3D scene or one large image.

  python sample.py                     # the built-in demo on the embedded tiny model, offline
  python sample.py --viz out.png       # the demo, drawing where each answer looked (out-video.png, ...)
  python sample.py --model llava-hf/llava-interleave-qwen-0.5b-hf \\
      --image a.jpg --image b.png "Compare <image> <image>"
  python sample.py --model PATH --video clip.mp4 --num-frames 16 "What happens in this video?"
  python sample.py --model PATH --views v1.png v2.png v3.png "How many chairs are in the room?"
  python sample.py --model lmms-lab/llava-next-interleave-qwen-0.5b \\
      --image photo.jpg --anyres "What does it say?"
  python sample.py --model PATH --bench questions.json --image-folder IMAGES \\
      --answers out/answers.jsonl        # LLaVA-Interleave Bench, resumable, then scored
  python sample.py --score out/answers.jsonl   # score an answers file (or the release's result.jsonl)

--model is a checkpoint folder or a hub id (org/name): an id is read from the Hugging Face cache, or
downloaded into it by huggingface_hub (offline, the cache must hold it); a folder of that name wins.
--image and --video also take http(s) URLs. Images go to the model in the order --image, --video
frames, --views. Without a prompt, a terminal on stdin starts a chat (the images stay in the
conversation); otherwise stdin is the prompt. The answer streams to stdout, statistics go to stderr
(--quiet silences them). Bad input gives one line on stderr and exit status 2.
"""
import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import re
import sys
import textwrap
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

import interleave

EMBEDDED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "m4-tiny")   # made by train.py
IMAGE_FILES = interleave.FRAME_EXTENSIONS + (".tif", ".tiff")
GREEDY = dict(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=256)
TILE = 256     # --viz: the side of each image's square on the sheet, in pixels
PER_ROW = 4    # --viz: squares per row of the sheet
UTF8_FIX = "give it as UTF-8 (iconv -t UTF-8 converts a file)"

# What each option must be, checked before anything is read or loaded: (name, type, test, what it
# must be). The generation settings (GREEDY's keys) are held to the same in generation_config.json.
RULES = (
    ("max_new_tokens", int, lambda v: v >= 1, "a whole number >= 1"),
    ("temperature", float, lambda v: math.isfinite(v) and v >= 0,
     "a finite number >= 0 (0 is greedy)"),
    ("top_k", int, lambda v: v >= 0, "a whole number >= 0 (0 keeps every token)"),
    ("top_p", float, lambda v: 0 < v <= 1, "a number above 0 and at most 1 (1 keeps every token)"),
    ("repetition_penalty", float, lambda v: math.isfinite(v) and v > 0,
     "a finite number above 0 (1 is no penalty)"),
    ("seed", int, lambda v: 0 <= v < 2 ** 63, "a whole number from 0 to 2**63 - 1"),
    ("num_frames", int, lambda v: v >= 1, "a whole number >= 1"),
)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?",
                   help="the question; each <image> marks where an image goes (none: in front)")
    p.add_argument("--model", help="a checkpoint folder or a hub id (default: the embedded tiny model)")
    p.add_argument("--demo", action="store_true",
                   help="one question per scenario (the default without arguments)")
    p.add_argument("--image", action="append", default=[],
                   help="an image file or http(s) URL; repeat for several")
    p.add_argument("--video",
                   help="a video (MP4, MOV, WebM, MKV, AVI), an animated GIF/WebP/PNG, a folder of "
                        "frames, or the http(s) URL of a file; each sampled frame is one image")
    p.add_argument("--num-frames", type=int, default=16, help="frames sampled uniformly from the video (16)")
    p.add_argument("--views", nargs="+", default=[], help="the views of a 3D scene")
    p.add_argument("--anyres", action="store_true", help="multi-patch: cut the one image into tiles (more detail)")
    g = p.add_argument_group("generation (default: greedy, or what the checkpoint's "
                             "generation_config.json says; --temperature above 0 samples, "
                             "--seed makes it repeatable)")
    for name, kind in (("max-new-tokens", int), ("temperature", float), ("top-k", int), ("top-p", float),
                       ("repetition-penalty", float), ("seed", int)):
        g.add_argument("--" + name, type=kind)
    p.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: the first available of cuda, mps, cpu)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="default: bf16 on a GPU, else fp32")
    p.add_argument("--attn", choices=interleave.ATTENTION_IMPLS, help="default: triton on CUDA, else sdpa")
    p.add_argument("--viz", metavar="OUT.png", help="draw where the answer looked in each image")
    p.add_argument("--quiet", action="store_true", help="no statistics on stderr")
    b = p.add_argument_group("LLaVA-Interleave Bench (asked greedily and scored as the release does)")
    b.add_argument("--bench", metavar="QUESTIONS.json",
                   help="ask every question of a bench file; needs --image-folder and --answers")
    b.add_argument("--image-folder", metavar="DIR", help="the folder the bench's image paths are in")
    b.add_argument("--answers", metavar="ANSWERS.jsonl",
                   help="one line per answer is appended here; a restarted run skips those answered")
    b.add_argument("--score", metavar="ANSWERS.jsonl",
                   help="only score an answers file (ours, or the release's result.jsonl): no model")
    return p.parse_args(argv)


def check_options(args):
    """Refuse an option out of its range (one line: the option, its value, what it must be) and a
    --viz file that Pillow cannot write, before anything is read or loaded."""
    for name, _, test, must in RULES:
        value = getattr(args, name)
        if value is not None and not test(value):
            option = "--" + name.replace("_", "-")
            raise interleave.InputError(f"{option} {value} is out of range: give {must}")
    if args.viz:
        check_viz_file(args.viz)
    if args.bench or args.score or args.image_folder or args.answers:
        check_bench_options(args)


def check_bench_options(args):
    """Refuse --bench and --score mixed with options they do not take, or given without theirs, and
    files and folders that are not there, before anything is read or loaded."""
    given = args.bench or args.score
    mode = "--bench" if args.bench else "--score"
    if not given:
        option = "--image-folder" if args.image_folder else "--answers"
        raise interleave.InputError(f"{option} is for --bench; give --bench QUESTIONS.json too")
    if args.bench and args.score:
        raise interleave.InputError("--bench scores its answers itself; give --bench or --score")
    # Options of the other modes, and (greedy, as the release) the sampling ones
    others = {"a prompt": args.prompt, "--image": args.image, "--video": args.video,
              "--views": args.views, "--viz": args.viz, "--anyres": args.anyres,
              "--demo": args.demo}
    for name in ("temperature", "top_k", "top_p", "repetition_penalty", "seed"):
        others["--" + name.replace("_", "-")] = getattr(args, name) is not None
    if args.score:
        others.update({"--model": args.model, "--device": args.device, "--dtype": args.dtype,
                       "--attn": args.attn, "--max-new-tokens": args.max_new_tokens})
    for name, value in others.items():
        if value:
            raise interleave.InputError(f"{mode} does not take {name}; leave it out")
    # ---- the files
    if args.score and not os.path.isfile(args.score):
        raise interleave.InputError(f"--score {args.score}: there is no such file")
    if args.bench:
        for option, value in (("--image-folder", args.image_folder), ("--answers", args.answers)):
            if not value:
                raise interleave.InputError(f"--bench needs {option} too")
        if not os.path.isfile(args.bench):
            raise interleave.InputError(f"--bench {args.bench}: there is no such file")
        if not os.path.isdir(args.image_folder):
            raise interleave.InputError(f"--image-folder {args.image_folder}: there is no such folder")
        folder = os.path.dirname(args.answers) or "."
        if not os.path.isdir(folder):
            raise interleave.InputError(f"--answers {args.answers}: there is no folder {folder}; "
                                        "create it first")


def check_viz_file(path):
    """Refuse a --viz file in a folder that does not exist, or of a kind Pillow cannot write an
    RGB picture as (tried on a 1x1 picture in memory)."""
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise interleave.InputError(f"--viz {path}: there is no folder {folder}; create it first")
    extension = os.path.splitext(path)[1].lower() or "a name without extension"
    kind = Image.registered_extensions().get(extension)
    try:
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=kind)
    except (ValueError, OSError):
        raise interleave.InputError(f"--viz {path}: Pillow cannot write an RGB picture as "
                                    f"{extension}; end the name in .png or .jpg") from None


def pick_device(name):
    """--device as a torch.device: cpu, cuda, cuda:N or mps, refused unless it is here. By default
    the first of cuda, mps and cpu that is here."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name):
        raise interleave.InputError(
            f"--device {name} is not a device: give cpu, cuda, cuda:N or mps")
    device = torch.device(name)
    cuda_here = device.type == "cuda" and (device.index or 0) < torch.cuda.device_count()
    if not (device.type == "cpu" or cuda_here or (device.type == "mps" and mps)):
        raise interleave.InputError(
            f"--device {name} is not available here; leave --device out to pick one")
    return device


def frames_that_fit(model):
    """How many video frames fit in the context of a local checkpoint folder, read from its
    config.json before any frame is decoded; None for a hub id not downloaded yet (build_inputs
    refuses too many slots later, after the download)."""
    if not os.path.isfile(os.path.join(model, "config.json")):
        return None
    config = interleave.read_config(model)
    return config.text.max_positions // config.vision.tokens


def check_utf8(text, where, fix=UTF8_FIX):
    """text, unless it holds bytes that are not UTF-8: Python keeps those of argv and stdin as lone
    surrogates (U+DC80..U+DCFF), which the tokenizer cannot take. InputError names where."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise interleave.InputError(
            f"{where} is not valid UTF-8 (at character {e.start}); {fix}") from None
    return text


def read_text(where, fix=UTF8_FIX, prompt=None):
    """A line typed after `prompt` at the terminal, or without one all of stdin: stripped, and
    refused (InputError naming where) if it is not valid UTF-8."""
    try:
        text = sys.stdin.read() if prompt is None else input(prompt)
    except UnicodeDecodeError as e:
        byte = e.object[e.start]
        raise interleave.InputError(
            f"{where} is not valid UTF-8 (byte {byte:#04x} at offset {e.start}); {fix}") from None
    return check_utf8(text.strip(), where, fix)


def is_a(value, kind):
    """Whether a JSON value is of kind int (a whole number) or float (any number); true and false
    are neither."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if kind is int else isinstance(value, (int, float))


def bad_field(file, name, value, must):
    """The line that refuses a field of a JSON file: the file, the field, its value, the fix."""
    return f"{file}: {name} is {json.dumps(value)[:40]}; it must be {must}: correct or delete it"


def check_generation_config(config, file):
    """Refuse a generation_config.json that is not an object, or whose settings, do_sample or
    eos_token_id have the wrong type or range: one line naming the file, the field and the value."""
    if not isinstance(config, dict):
        raise interleave.CheckpointError(
            f"{file}: the top level is {json.dumps(config)[:40]}, not an object {{...}}; "
            "correct or delete the file")
    # The settings the file may hold, held to the options' rules
    for name, kind, test, must in RULES:
        value = config.get(name)
        if name in GREEDY and value is not None and not (is_a(value, kind) and test(value)):
            raise interleave.CheckpointError(bad_field(file, name, value, must))
    do_sample = config.get("do_sample")
    if do_sample is not None and not isinstance(do_sample, bool):
        raise interleave.CheckpointError(bad_field(file, "do_sample", do_sample, "true or false"))
    eos = config.get("eos_token_id")   # one id, a list of them, or absent
    ids = eos if isinstance(eos, list) else [eos]
    if eos is not None and not all(is_a(i, int) and i >= 0 for i in ids):
        must = "a token id (a whole number >= 0) or a list of them"
        raise interleave.CheckpointError(bad_field(file, "eos_token_id", eos, must))


def generation_settings(args, path, log):
    """Greedy, unless the checkpoint's generation_config.json says otherwise; command-line options
    win over both. As in transformers, temperature/top-k/top-p apply only when the file sets
    do_sample; the penalty always does. Returns (settings, the file's eos ids). The file is refused
    (CheckpointError) by check_generation_config; the options were checked by check_options."""
    settings = dict(GREEDY)
    stops = []
    file = os.path.join(path, "generation_config.json")
    if os.path.isfile(file):
        try:
            with open(file, encoding="utf-8") as f:
                config = json.load(f)
        except ValueError as e:
            raise interleave.CheckpointError(f"{file} is not valid JSON ({e})") from None
        check_generation_config(config, file)
        sampling = ("temperature", "top_k", "top_p") if config.get("do_sample") else ()
        keys = ("repetition_penalty", "max_new_tokens", *sampling)
        found = {key: config[key] for key in keys if config.get(key) is not None}
        settings.update(found)
        eos = config.get("eos_token_id")   # one id, a list of them, or absent
        if eos is not None:
            stops = eos if isinstance(eos, list) else [eos]
        described = ", ".join(f"{k} {v}" for k, v in found.items())
        log(f"defaults from {os.path.basename(file)}: " + (described or "greedy"))
    for key in settings:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    return settings, stops


class Stream:
    """Prints the answer as its tokens arrive. Byte-level BPE may split one character over several
    tokens, so the tokens so far are decoded as a whole and only the new text is printed, holding
    back a trailing U+FFFD (an unfinished character) until the next token completes it."""

    def __init__(self, tokenizer, stop_ids, out):
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        self.out = out
        self.ids = []           # the answer's tokens, without the stop token
        self.shown = ""         # the text printed so far
        self.stopped = False    # a stop token came: later tokens are not shown
        self.first_at = None    # time.perf_counter() at the first token

    def __call__(self, token):
        if not self.first_at:
            self.first_at = time.perf_counter()
        if not self.stopped and int(token[0]) in self.stop_ids:
            self.stopped = True
        if not self.stopped:
            self.ids.append(int(token[0]))
            self.flush(final=False)

    def flush(self, final=True):
        """Print the text not shown yet (when final: all of it, and a newline); return the answer."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if final or not text.endswith("\ufffd"):
            ending = "\n" if final else ""
            self.out.write(text[len(self.shown):] + ending)
            self.out.flush()
            self.shown = text
        return text


@dataclasses.dataclass
class AttentionRecord:
    """The attention to each prompt position, added up over `steps` (layer, decoding step) pairs.
    record[0] and record[1] still read total and steps, as in the list this record was."""
    total: torch.Tensor   # (prompt_len,)
    steps: int = 0

    def __getitem__(self, index):
        return (self.total, self.steps)[index]


@contextlib.contextmanager
def recording_attention(prompt_len):
    """For --viz: wraps interleave.attention (looked up at each call) to add up, in every layer at
    every decoding step, the newest token's attention to the prompt, averaged over heads. Yields an
    AttentionRecord, which also reads as [sum (prompt_len,), count]."""
    record = AttentionRecord(total=torch.zeros(prompt_len))
    inner = interleave.attention

    def attention(q, k, v, causal, impl, scale=None, cu_seqlens=None):
        """interleave.attention, adding each decoding step's attention to record on the way."""
        # A decoding step has one query, the newest token (the vision tower is not causal)
        if causal and q.shape[2] == 1:
            keys = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)     # GQA: (B, H, Tk, D)
            factor = scale or q.shape[-1] ** -0.5
            scores = (q.float() @ keys.float().transpose(-1, -2)) * factor   # (B, H, 1, Tk)
            share = scores.softmax(-1).mean(dim=(0, 1, 2))                   # (Tk,)
            record.total += share[:prompt_len].cpu()                         # (T,)
            record.steps += 1
        return inner(q, k, v, causal, impl, scale, cu_seqlens)

    interleave.attention = attention
    try:
        yield record
    finally:
        interleave.attention = inner


def attention_maps(sample, weights, config):
    """The answer's attention `weights` (T,) cut into one map per image: the plain image's
    grid x grid slots, or the tile grid of a multi-patch image (its image_newline column dropped).
    Returns (maps, each image's share of the attention)."""
    s = config.vision.image_size // config.vision.patch_size
    begin = 0
    maps = []
    shares = []
    # Each image's slots are contiguous, in image order, with text in between
    for size in sample.image_sizes:
        n = interleave.image_slots(config, size)
        while int(sample.input_ids[begin]) != config.image_token_id:
            begin += 1
        if size is None:
            maps.append(weights[begin:begin + s * s].view(s, s))   # (s, s)
        else:
            # After the base view's s*s slots: the R x C tile grid, each row ending in an image_newline
            _, _, _, (top, bottom, left, right) = interleave.multipatch_layout(size, config)
            tiles = weights[begin + s * s:begin + n].view(bottom - top, right - left + 1)   # (R, C + 1)
            maps.append(tiles[:, :-1])                                                    # (R, C)
        shares.append(float(weights[begin:begin + n].sum()))
        begin += n
    return maps, shares


def heat_tile(image, heat, low, high):
    """The image in grey, fitted to TILE (small images enlarged with nearest neighbour, so their
    pixels stay sharp), with its map in red on top, one square per patch."""
    image = image.convert("L").convert("RGB")
    scale = TILE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    enlarge = scale > 1
    image = image.resize(size, Image.NEAREST if enlarge else Image.BICUBIC)
    alpha = Image.fromarray((200 * (heat - low) / max(high - low, 1e-12)).byte().numpy())
    red = Image.new("RGB", image.size, "red")
    return Image.composite(red, image, alpha.resize(image.size, Image.NEAREST))


def colour_scale(sheet, top, low, high):
    """A bar from no attention (grey) to the most (red) at height top, with its two ends' values:
    the attention of one slot, averaged over the answer's tokens and the layers."""
    draw = ImageDraw.Draw(sheet)
    left = 8
    width = min(256, sheet.width - 16)
    for x in range(width):
        level = x / max(width - 1, 1)
        grey = round(128 * (1 - level * 200 / 255))
        colour = (grey + round(255 * level * 200 / 255), grey, grey)
        draw.line((left + x, top, left + x, top + 10), fill=colour)
    draw.text((left, top + 12), f"{low:.3g}", fill="black")
    most = f"{high:.3g} per slot"
    draw.text((left + width - draw.textlength(most), top + 12), most, fill="black")


def draw_attention(out_file, images, names, sample, weights, config, log, caption=()):
    """Where the answer looked: each image in grey with the answer's attention in red on top, its
    name and share below it, the caption lines (question, answer, expected answer) above, and
    one colour scale for all images below."""
    maps, shares = attention_maps(sample, weights, config)
    low = min(float(m.min()) for m in maps)
    high = max(float(m.max()) for m in maps)
    # ---- the sheet: caption, then rows of TILE squares each with a label line, then the scale
    width = TILE * min(len(images), PER_ROW)
    # About 6 pixels a character in Pillow's default font
    wrapped = [part for text in caption for part in textwrap.wrap(text, width // 6 - 2)]
    line = 14
    header = line * len(wrapped) + 8
    cell = TILE + line + 8
    rows = -(-len(images) // PER_ROW)   # rounded up
    sheet = Image.new("RGB", (width, header + cell * rows + 32), "white")
    draw = ImageDraw.Draw(sheet)
    for i, text in enumerate(wrapped):
        draw.text((8, 4 + line * i), text, fill="black")
    # ---- each image in its square, centred, its label below it
    for i, (image, heat, name, share) in enumerate(zip(images, maps, names, shares)):
        tile = heat_tile(image, heat, low, high)
        x = TILE * (i % PER_ROW)
        y = header + cell * (i // PER_ROW)
        sheet.paste(tile, (x + (TILE - tile.width) // 2, y + (TILE - tile.height) // 2))
        draw.text((x + 4, y + TILE + 2), f"{name}: {100 * share:.0f}% of the attention",
                  fill="black")
    colour_scale(sheet, header + cell * rows + 4, low, high)
    # ---- written under a temporary name, then renamed: a picture is never left half-written
    partial = out_file + ".partial"
    extension = os.path.splitext(out_file)[1].lower()
    sheet.save(partial, format=Image.registered_extensions()[extension])
    os.replace(partial, out_file)
    log(f"attention map in {out_file}; the answer's attention on each image: "
        + ", ".join(f"{a} {100 * x:.0f}%" for a, x in zip(names, shares)))


def peak_memory(device):
    """The process's peak memory so far, as words for the statistics line."""
    if device.type == "cuda":
        return f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    import resource   # Unix only, so imported only here
    per_gib = 2 ** 30 if sys.platform == "darwin" else 2 ** 20   # ru_maxrss: bytes on macOS, KiB on Linux
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / per_gib
    return f"peak RSS {rss:.2f} GiB"


@dataclasses.dataclass
class Session:
    """A loaded model with its tokenizer and generation settings; answer() runs one chat turn."""
    model: interleave.LlavaInterleave
    tokenizer: object    # tokenizers.Tokenizer
    settings: dict       # GREEDY's keys, from generation_settings
    stops: list          # the token ids that end an answer
    args: argparse.Namespace
    log: object          # log(message) writes one line of statistics

    def answer(self, turns, images, names, before="", out=None, expected=None):
        """Answer the conversation so far: stream the answer to out (stdout), return its text.
        expected: the right answer, when known (the demo), for the --viz caption."""
        out = out or sys.stdout
        config = self.model.config
        settings = self.settings
        device = self.model.decoder.embed_tokens.weight.device

        # ---- the prompt, which must fit in the context
        sample = interleave.build_inputs(turns, self.tokenizer, config, anyres=self.args.anyres)
        n = len(sample.input_ids)
        context = config.text.max_positions
        if n >= context:
            raise interleave.InputError(
                f"the prompt takes {n} tokens, more than the model's context of {context}; "
                "use fewer images or frames, or a shorter prompt")
        slots = [interleave.image_slots(config, size) for size in sample.image_sizes]
        # Video frames and views take the same slots each: one entry for all, not one per image
        if len(set(slots)) == 1 and len(slots) > 2:
            described = f"{len(slots)} images x {slots[0]}"
        else:
            described = ", ".join(f"{a} {k}" for a, k in zip(names, slots)) or "none"
        self.log(f"{n} prompt tokens, image slots: {described}")

        # ---- generate, streaming each token to out
        out.write(before)
        pixels = None if sample.pixel_values is None else sample.pixel_values.to(device)
        seed = self.args.seed
        generator = None if seed is None else torch.Generator(device).manual_seed(seed)
        stream = Stream(self.tokenizer, self.stops, out)
        start = time.perf_counter()
        recorder = recording_attention(n) if self.args.viz else contextlib.nullcontext()
        with recorder as record:
            new = self.model.generate(
                sample.input_ids[None].to(device), pixels, sample.image_sizes,
                max_new_tokens=min(settings["max_new_tokens"], context - n),
                temperature=settings["temperature"], top_k=settings["top_k"], top_p=settings["top_p"],
                repetition_penalty=settings["repetition_penalty"],
                stop_ids=self.stops, generator=generator, on_token=stream,
                # --viz wraps attention(), which a CUDA graph would not call again: no graph then
                cuda_graph=False if self.args.viz else None)
        end = time.perf_counter()
        count = new.shape[1]
        text = stream.flush()

        # ---- statistics on stderr, and the attention map for --viz
        rate = ""
        if count > 1:
            rate = f", {(count - 1) / (end - stream.first_at):.1f} tokens/s after the first"
        self.log(f"time to first token {stream.first_at - start:.2f} s, {count} tokens{rate}, "
                 f"{peak_memory(device)}")
        if record is not None and record.steps:
            weights = record.total / record.steps
            question = turns[-1][1].replace(interleave.IMAGE_MARKER, "").split()
            caption = [f"question: {' '.join(question)}", f"answer: {text.strip()}"]
            if expected is not None:
                caption.append(f"expected answer: {expected}")
            draw_attention(self.args.viz, images, names, sample, weights, config, self.log,
                           caption)
        return text


def demo_inputs():
    """One held-out example of each scenario from the synthetic M4 tasks that the embedded model
    learned, drawn with Pillow by data/make_m4.py: the demo needs no files and no network.
    Yields (task, question, images, anyres, expected answer)."""
    from data import make_m4   # as train.py imports it
    for task in make_m4.TASKS:
        images, question, expected = make_m4.make_example(task, seed=0, split="val", index=0)[:3]
        # As in training: the question's markers sample that many frames, put in front
        if task == "video":
            images = interleave.read_video_frames(images, question.count(interleave.IMAGE_MARKER))
            question = question.replace(interleave.IMAGE_MARKER, "").lstrip("\n")
        yield task, question, images, task == "multi_patch", expected


def demo(session):
    """One question per scenario, each under a heading with the expected answer."""
    viz = session.args.viz
    for task, question, images, anyres, expected in demo_inputs():
        if anyres and not session.model.config.has_image_newline:
            session.log(f"({task} skipped: {interleave.MULTIPATCH_NEEDS_NEWLINE})")
            continue
        # One picture per scenario: out.png -> out-video.png, ...
        if viz:
            session.args.viz = f"-{task}".join(os.path.splitext(viz))
        session.args.anyres = anyres
        names = [f"{task} {i + 1}" for i in range(len(images))]
        heading = f"[{task}, expected answer: {expected}]\n{question}\n> "
        session.answer([("user", question, images)], images, names, before=heading,
                       expected=expected)


def chat(session, images, names):
    """Questions from the terminal until an empty line or Ctrl-D; the images go with the first."""
    session.log(f"chat: {len(images)} images in the first turn; an empty line or Ctrl-D ends the chat")
    turns = []
    while True:
        try:
            text = read_text("that line", "type it again", prompt="you: ")
        except EOFError:
            break
        except interleave.InputError as e:
            # Bytes that are not UTF-8: refuse the line, keep the conversation
            print(f"error: {e}", file=sys.stderr)
            continue
        if not text:
            break
        turns.append(("user", text, [] if turns else images))
        try:
            reply = session.answer(turns, images, names, before="model: ")
            turns.append(("assistant", reply))
        except interleave.InputError as e:
            # e.g. markers that do not match the images: say so, let them retype the question
            print(f"error: {e}", file=sys.stderr)
            turns.pop()


# ==== LLaVA-Interleave Bench: the paper's benchmark, asked and scored as the release does
# The release: LLaVA-NeXT's llava/eval/model_vqa_demon_qwen_new.py asks, evaluate_demon_new.py scores
# (read at commit 0f3e941; both files were removed from the repository later).

# The release's categories in its order, under the keys its scorer writes to eval_cat.json
CATEGORIES = (
    ("multi_modal_dialogue", ("MMCoQA", "ALFRED")),
    ("visual_story_telling_list", ("AESOP", "DiDeMoSV", "FlintstonesSV", "PororoSV", "VIST")),
    ("visual_relation_inference", ("IEdit", "Spot-the-Diff", "Birds-to-Words", "CLEVR-Change")),
    ("multi_modal_cloze",
     ("COMICS_Dialogue", "COMICS_Panel", "RecipeQA_VisualCloze", "RecipeQA_TextCloze")),
    ("knowledge_grounded_qa", ("WebQA", "TQA", "MultiModalQA")),
    ("text_rich_images_qa", ("SlideVQA", "OCR-VQA", "DocVQA")),
    ("multi_image_reasoning",
     ("Fashion200K", "NLVR2", "nuscenes", "VizWiz", "MIT-States_StateCoherence",
      "MIT-States_PropertyCoherence", "VISION", "RecipeQA_ImageCoherence")),
    ("mantis", ("NLVR2_Mantis", "QBench", "Mantis", "BLINK", "MVBench")),
    ("ood", ("RAVEN", "BAPPS", "HQ-Edit")),
)
IN_DOMAIN = 7   # the first seven categories are the bench's in-domain part
# The paper's numbers for a release, found by its name in the answers' model_id. Only the 0.5B's
# five are known here; which of the bench's datasets the paper's NLVR2 is (NLVR2 or NLVR2_Mantis)
# and how it averages the in-domain part are not checked against the paper.
PAPER = {
    "0.5b": {"in-domain": 43.9, "NLVR2": 67.8, "QBench": 52.0, "Mantis": 45.6, "BLINK": 39.2},
}
# The VQA-style marks of the release's punctuation rule
MARKS = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
         "`", ",", "?", "!")
DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The release writes (?!<=\d)(\.)(?!\d): its first group looks ahead, not behind, so it only says
# that the period is not followed by "<=" and a digit, which is always true there.
LONE_PERIOD = re.compile(r"\.(?!\d)")
PERIODS_DELETED = re.UNICODE   # 32: the release passes this flag where re.sub takes its count
PREDICTION_CHARS = 512         # open-ended: a longer (normalised) prediction is cut to this
CHOICE_LETTERS = "abcdefgh"
BENCH_MAX_NEW_TOKENS = 1024    # the release's
PROGRESS_EVERY = 5.0           # seconds between progress lines
SKIPS_SHOWN = 20               # the reasons of the first 20 records skipped are shown


def strip_punctuation(text):
    """The release's punctuation rule: a mark that stands next to a space anywhere in the text, or
    any mark when the text has a digit-comma-digit, is deleted everywhere, else replaced by spaces;
    then periods not followed by a digit are deleted, the first 32 of them only."""
    digit_comma_digit = DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in MARKS:
        beside_space = mark + " " in text or " " + mark in text
        if beside_space or digit_comma_digit:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return LONE_PERIOD.sub("", out, count=PERIODS_DELETED)


def normalise(answer):
    """An answer as the release compares it: newlines and tabs to spaces, stripped, the punctuation
    rule, quotes and brackets stripped from the ends (in the release's order: ' " ) (), lower case."""
    text = answer.replace("\n", " ")
    text = text.replace("\t", " ")
    text = strip_punctuation(text.strip())
    for end in ("'", '"', ")", "("):
        text = text.strip(end)
    return text.strip().lower()


def choice_letter(prediction):
    """multi-choice: a normalised prediction with ":" becomes the last of its ":"-separated pieces
    that is one letter a-h, if one is ("answer: b" -> "b"); otherwise it stays as it is."""
    if ":" not in prediction:
        return prediction
    for piece in prediction.split(":"):
        piece = piece.strip()
        if len(piece) == 1 and piece in CHOICE_LETTERS:
            prediction = piece
    return prediction


def sentence_words(text):
    """The `rouge` package's split: sentences at every period (empty ones dropped), each one's words
    at whitespace; a sentence of whitespace alone is one empty word."""
    sentences = [part for part in text.split(".") if part]
    return [" ".join(part.split()).split(" ") for part in sentences]


def lcs_words(x, y):
    """The words of the longest common subsequence of the word lists x and y that the `rouge`
    package traces back (from the end; on a tie it steps back in y)."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            if x[i - 1] == y[j - 1]:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    words = set()
    i = len(x)
    j = len(y)
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            words.add(x[i - 1])
            i -= 1
            j -= 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_l(prediction, reference):
    """ROUGE-L F as the `rouge` package (1.0.1) computes "rouge-l" "f": summary level, and over
    distinct words, since the package keeps its words in sets. The hits are the distinct words of
    the traced LCS of every (reference sentence, prediction sentence) pair; precision and recall
    divide them by the prediction's and the reference's distinct words. 0 when either side has no
    sentence: the release scores an empty text 0, and the package raises ValueError on a text of
    periods alone (which would stop the release's scorer)."""
    predicted = sentence_words(prediction)
    referenced = sentence_words(reference)
    if not predicted or not referenced:
        return 0.0
    hits = set()
    for ref_words in referenced:
        for pred_words in predicted:
            hits |= lcs_words(ref_words, pred_words)
    precision = len(hits) / len({word for words in predicted for word in words})
    recall = len(hits) / len({word for words in referenced for word in words})
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))


def dataset_kind(dataset, question_type):
    """How the release scores a dataset, from its first answer's question_type: "open-ended" by
    ROUGE-L, "multi-choice" (and any type of the dataset called Mantis) by exact match; None for
    another type (the release stops there; we skip the dataset)."""
    if question_type == "open-ended":
        return "open-ended"
    if question_type == "multi-choice" or dataset == "Mantis":
        return "multi-choice"
    return None


def score_answer(kind, prediction, reference):
    """One answer's score by the release's rules, on the normalised texts: exact match after
    choice_letter, or ROUGE-L F with the prediction cut to 512 characters (an empty prediction or
    reference has no sentence: 0, as the release scores it)."""
    prediction = normalise(prediction)
    reference = normalise(reference)
    if kind == "multi-choice":
        return float(choice_letter(prediction) == reference)
    return rouge_l(prediction[:PREDICTION_CHARS], reference)


ANSWER_FIELDS = {"dataset": str, "pred_response": str, "gt_response": str, "question_type": str}


def answer_problem(line):
    """Why a parsed line of an answers file cannot be scored, or None if it can."""
    if not isinstance(line, dict):
        return "not a JSON object"
    for name, kind in ANSWER_FIELDS.items():
        if not isinstance(line.get(name), kind):
            return f"no text field {name!r}"
    if "sample_id" not in line:
        return "no 'sample_id'"
    return None


def read_answers(path):
    """The lines of an answers file (ours, or the release's result.jsonl) that can be scored, and
    (line number, reason) for each that cannot: not JSON, or missing a field."""
    good = []
    bad = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except ValueError:
                bad.append((number, "not valid JSON"))
                continue
            problem = answer_problem(line)
            if problem:
                bad.append((number, problem))
            else:
                good.append(line)
    return good, bad


def score_answers(lines):
    """The release's scores: {dataset: {"Rouge-L f" or "Accuracy": mean}} in the order datasets
    first appear, and {category key: mean of its datasets' scores} in the release's order; also
    the datasets skipped, as (dataset, reason, lines). A dataset's kind is its first line's."""
    by_dataset = {}
    for line in lines:
        by_dataset.setdefault(line["dataset"], []).append(line)
    datasets = {}
    skipped = []
    for dataset, group in by_dataset.items():
        kind = dataset_kind(dataset, group[0]["question_type"])
        if kind is None:
            reason = f"unknown question_type {group[0]['question_type']!r}"
            skipped.append((dataset, reason, len(group)))
            continue
        scores = [score_answer(kind, x["pred_response"], x["gt_response"]) for x in group]
        metric = "Rouge-L f" if kind == "open-ended" else "Accuracy"
        datasets[dataset] = {metric: float(np.mean(scores))}
    categories = {}
    for key, names in CATEGORIES:
        # As the release: a running sum in the order the datasets first appear
        members = [next(iter(datasets[d].values())) for d in datasets if d in names]
        if members:
            categories[key] = sum(members) / len(members)
    return datasets, categories, skipped


def paper_numbers(lines):
    """(release, the paper's numbers for it) for the release that wrote the answers (their one
    model_id names it), or (None, {}) when the paper has none for it."""
    model_ids = {str(line.get("model_id", "")).lower() for line in lines}
    if len(model_ids) != 1:
        return None, {}
    model_id = model_ids.pop()
    for release, numbers in PAPER.items():
        if release in model_id:
            return release, numbers
    return None, {}


def bench_table(datasets, categories, lines):
    """The scores as text, x100: each category (its key as the release names it) with its datasets
    below it, in the release's order, then the mean of the in-domain categories, then the datasets
    of no category; the paper's numbers beside them where it has them."""
    counts = {}
    for line in lines:
        counts[line["dataset"]] = counts.get(line["dataset"], 0) + 1
    release, paper = paper_numbers(lines)
    header = f"{'category / dataset':36} {'answers':>7}  {'metric':9} {'score':>6}"
    rows = [header + (f"  paper ({release})" if paper else "")]

    def row(name, n, metric, score, paper_key=None):
        """One line of the table, the paper's number at the end where it has one."""
        text = f"{name:36} {n:>7}  {metric:9} {100 * score:6.2f}"
        paper_key = paper_key or name.strip()
        if paper_key in paper:
            text += f"  {paper[paper_key]:5.1f}"
        return text

    listed = set()
    for key, names in CATEGORIES:
        if key in categories:
            rows.append(row(key, "", "mean", categories[key]))
        for name in names:
            if name in datasets:
                metric, score = next(iter(datasets[name].items()))
                rows.append(row("  " + name, counts[name], metric, score))
                listed.add(name)
    in_domain = [categories[key] for key, _ in CATEGORIES[:IN_DOMAIN] if key in categories]
    if in_domain:
        mean = sum(in_domain) / len(in_domain)
        rows.append(row(f"in-domain: {len(in_domain)} categories", "", "mean", mean, "in-domain"))
    others = [name for name in datasets if name not in listed]
    if others:
        rows.append("datasets in no category of the release")
    for name in others:
        metric, score = next(iter(datasets[name].items()))
        rows.append(row("  " + name, counts[name], metric, score))
    return "\n".join(rows) + "\n"


def write_atomic(path, text):
    """Write text to path through a temporary name, so that path is never half-written."""
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(partial, path)


def score_file(path, log, out=None):
    """Score an answers file (ours, or the release's result.jsonl): print the table to out (stdout)
    and write eval_dataset.json, eval_cat.json (the release's files and keys) and eval_table.txt
    beside it. Lines and datasets that cannot be scored are skipped, counted and named on log."""
    out = out or sys.stdout
    lines, bad = read_answers(path)
    for number, reason in bad[:SKIPS_SHOWN]:
        log(f"{path}: line {number} skipped: {reason}")
    if len(bad) > SKIPS_SHOWN:
        log(f"{path}: {len(bad) - SKIPS_SHOWN} more lines skipped")
    datasets, categories, skipped = score_answers(lines)
    for dataset, reason, n in skipped:
        log(f"{path}: dataset {dataset} ({n} answers) skipped: {reason}")
    skipped_lines = len(bad) + sum(n for _, _, n in skipped)
    scored = len(lines) - sum(n for _, _, n in skipped)
    table = bench_table(datasets, categories, lines)
    summary = f"{path}: {scored} answers scored, {skipped_lines} lines skipped\n"
    folder = os.path.dirname(os.path.abspath(path))
    write_atomic(os.path.join(folder, "eval_dataset.json"), json.dumps(datasets, indent=4))
    write_atomic(os.path.join(folder, "eval_cat.json"), json.dumps(categories, indent=4))
    write_atomic(os.path.join(folder, "eval_table.txt"), summary + table)
    out.write(summary + table)
    out.flush()
    return datasets, categories


@dataclasses.dataclass
class BenchItem:
    """One bench record, checked: its id, dataset and question type, and its turns as
    (question, image paths, reference answer); the images all go with their markers' turns."""
    sample_id: object
    dataset: str
    question_type: str
    turns: list


def bench_item(record, image_folder):
    """A bench record -> BenchItem, or InputError saying why it cannot be asked: not an object,
    no sample_id or metadata, an unknown question_type, turns that do not alternate human and gpt,
    no images, a missing image file, markers that do not match the images."""
    if not isinstance(record, dict) or "sample_id" not in record:
        raise interleave.InputError("not an object with a 'sample_id'")
    name = f"sample_id {interleave.shown(record['sample_id'])}"
    metadata = record.get("metadata")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("dataset"), str):
        raise interleave.InputError(f"{name}: no metadata.dataset")
    question_type = metadata.get("question_type")
    if dataset_kind(metadata["dataset"], question_type) is None:
        raise interleave.InputError(f"{name}: unknown question_type "
                                    f"{interleave.shown(question_type)}")
    # ---- the turns: human, gpt, human, gpt, ...
    turns = interleave.record_turns(name, record)
    roles = [role for role, _ in turns]
    if len(turns) % 2 or roles != ["user", "assistant"] * (len(turns) // 2):
        raise interleave.InputError(f"{name}: the turns must alternate human, gpt, ...")
    # ---- the images, each an existing file inside the image folder
    video, images = interleave.record_media(name, record)
    if video is not None:
        raise interleave.InputError(f"{name}: a video; give its frames as 'image' files")
    if not images:
        raise interleave.InputError(f"{name}: no images")
    paths = [interleave.media_path(name, image_folder, path) for path in images]
    for path in paths:
        if not os.path.isfile(path):
            raise interleave.InputError(f"{name}: image file {path} is missing")
    # ---- each question with the images of its markers (no markers: all go with the first)
    questions = [text for role, text in turns if role == "user"]
    markers = [text.count(interleave.IMAGE_MARKER) for text in questions]
    if sum(markers) not in (0, len(paths)):
        raise interleave.InputError(f"{name}: {sum(markers)} {interleave.IMAGE_MARKER} markers "
                                    f"for {len(paths)} images")
    if not sum(markers):
        markers[0] = len(paths)
    starts = np.cumsum([0] + markers).tolist()
    answers = [text for role, text in turns if role == "assistant"]
    asked = []
    for i, (question, reference) in enumerate(zip(questions, answers)):
        asked.append((question, paths[starts[i]:starts[i + 1]], reference))
    return BenchItem(record["sample_id"], metadata["dataset"], question_type, asked)


def read_bench(path, image_folder):
    """The questions file (a JSON list of records) -> the BenchItems that can be asked, and the
    (sample_id, reason) of each record skipped (a sample_id seen before is skipped too)."""
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise interleave.InputError(f"--bench {path} is not valid JSON ({e})") from None
    if not isinstance(records, list):
        raise interleave.InputError(f"--bench {path}: the top level must be a list of records")
    items = []
    skipped = []
    seen = set()
    for record in records:
        try:
            item = bench_item(record, image_folder)
        except interleave.InputError as e:
            skipped.append(str(e))
            continue
        key = json.dumps(item.sample_id)
        if key in seen:
            skipped.append(f"sample_id {key}: seen before")
            continue
        seen.add(key)
        items.append(item)
    return items, skipped


def answered_turns(path, log):
    """{(sample_id as JSON, turn): answer} of the answers already in our answers file, for a
    restarted run. A last line cut short by a kill is cut off the file (it is asked again)."""
    done = {}
    if not os.path.exists(path):
        return done
    with open(path, "rb+") as f:
        data = f.read()
        whole = data.rfind(b"\n") + 1
        if whole < len(data):
            log(f"{path}: its last line was cut short (the run was killed); asking it again")
            f.truncate(whole)
    for text in data[:whole].decode("utf-8", errors="replace").splitlines():
        try:
            line = json.loads(text)
            key = (json.dumps(line["sample_id"]), line["turn"])
            done[key] = str(line["pred_response"])
        except (ValueError, TypeError, KeyError):
            continue   # the scorer skips and counts it
    return done


def words(tokenizer, text):
    """The token ids of plain text (no special tokens added)."""
    return tokenizer.encode(text, add_special_tokens=False).ids


def release_prompt_ids(turns, tokenizer, config):
    """The conversation so far (user turns with their image paths, the model's own answers) as the
    release's bench script tokenises it (its preprocess_qwen), which is not the chat template the
    model was trained with: the system block again before every question, each text piece
    tokenised alone, a newline after each image's slots, the assistant header; an earlier answer
    then <|im_end|> with no newline (the script appends the ids it generated; we tokenise the
    answer's text again, so that a resumed run asks exactly what an unbroken one asks). A question
    without <image> markers gets its images at its start."""
    start = tokenizer.token_to_id("<|im_start|>")
    end = tokenizer.token_to_id("<|im_end|>")
    newline = words(tokenizer, "\n")
    slots = interleave.image_slots(config)
    ids = []
    for turn in turns:
        role = turn[0]
        text = turn[1]
        if role == "assistant":
            ids += words(tokenizer, text) + [end]
            continue
        images = turn[2]
        if images and interleave.IMAGE_MARKER not in text:
            text = interleave.IMAGE_MARKER * len(images) + text
        ids += [start] + words(tokenizer, "system") + newline
        ids += words(tokenizer, interleave.SYSTEM_PROMPT) + [end] + newline
        ids += [start] + words(tokenizer, "user") + newline
        pieces = text.split(interleave.IMAGE_MARKER)
        for i, piece in enumerate(pieces):
            ids += words(tokenizer, piece)
            if i < len(pieces) - 1:
                ids += [config.image_token_id] * slots + newline
        ids += [end] + newline
        ids += [start] + words(tokenizer, "assistant") + newline
    return ids


def bench_answer(session, turns):
    """The model's greedy answer to the conversation so far, asked with the release's prompt
    (release_prompt_ids) and its images as plain views, stripped as the release strips it."""
    model = session.model
    config = model.config
    device = model.decoder.embed_tokens.weight.device
    ids = release_prompt_ids(turns, session.tokenizer, config)
    # every image of the questions so far, in order
    paths = []
    for turn in turns:
        if turn[0] == "user":
            paths += turn[2]
    n = len(ids)
    budget = min(session.settings["max_new_tokens"], config.text.max_positions - n)
    if budget < 1:
        raise interleave.InputError(f"the prompt takes {n} tokens, the model's whole context")
    pixels = torch.cat([interleave.preprocess(path, config) for path in paths]).to(device)
    input_ids = torch.tensor([ids], device=device)   # (1, T)
    new = model.generate(input_ids, pixels, [None] * len(paths), max_new_tokens=budget,
                         stop_ids=session.stops)
    out = new[0].tolist()
    stops = [i for i, token in enumerate(out) if token in session.stops]
    if stops:
        out = out[:stops[0]]
    return session.tokenizer.decode(out, skip_special_tokens=True).strip()


def ask_item(session, item, done, out, model_id):
    """Ask a record's questions in order, each after the model's own earlier answers (those of a
    killed run are read back from done); append a line to out for each new answer, made durable
    before the next question."""
    key = json.dumps(item.sample_id)
    turns = []
    for turn, (question, images, reference) in enumerate(item.turns):
        turns.append(("user", question, images))
        reply = done.get((key, turn))
        if reply is None:
            reply = bench_answer(session, turns)
            line = {"dataset": item.dataset, "sample_id": item.sample_id, "turn": turn,
                    "prompt": question, "pred_response": reply, "gt_response": reference,
                    "question_type": item.question_type, "model_id": model_id}
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
        turns.append(("assistant", reply))


def run_bench(session, args, bench, log):
    """Ask every question of bench (read_bench's items and skipped records) not answered yet in
    --answers, greedily, appending as it goes, with progress and an ETA on log; then score the
    answers file. Records that cannot be asked are skipped, named and counted."""
    items, skipped = bench
    model_id = os.path.basename(os.path.normpath(args.model or EMBEDDED))
    # Greedy, as the release: only the number of new tokens can be chosen
    budget = args.max_new_tokens or BENCH_MAX_NEW_TOKENS
    session.settings = dict(session.settings, max_new_tokens=budget)
    log(f"the bench: greedy, at most {budget} new tokens an answer")
    done = answered_turns(args.answers, log)
    todo = [x for x in items
            if any((json.dumps(x.sample_id), t) not in done for t in range(len(x.turns)))]
    log(f"{args.bench}: {len(items)} records to ask, {len(items) - len(todo)} answered before, "
        f"{len(skipped)} skipped")
    start = time.perf_counter()
    shown_at = start
    with open(args.answers, "a", encoding="utf-8") as out:
        for k, item in enumerate(todo, 1):
            try:
                ask_item(session, item, done, out, model_id)
            except interleave.InputError as e:
                skipped.append(f"sample_id {json.dumps(item.sample_id)}: {e}")
            now = time.perf_counter()
            if now - shown_at >= PROGRESS_EVERY or k == len(todo):
                left = (now - start) / k * (len(todo) - k)
                log(f"[{k}/{len(todo)}] {now - start:.0f} s, about {left:.0f} s left")
                shown_at = now
    for reason in skipped[:SKIPS_SHOWN]:
        log(f"skipped: {reason}")
    if len(skipped) > SKIPS_SHOWN:
        log(f"skipped: {len(skipped) - SKIPS_SHOWN} more")
    log(f"{len(skipped)} records skipped")
    return score_file(args.answers, log)


def load_session(args, device, log):
    """The model of --model (default: the embedded one) on device, with its tokenizer, its
    generation settings and its stop tokens."""
    # ---- how to run: bf16 on a GPU, else fp32
    default_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype
    if args.attn == "triton" and device.type == "cpu":
        # The kernel then runs in Triton's interpreter (slow)
        os.environ.setdefault("TRITON_INTERPRET", "1")

    # ---- the model, its tokenizer and its generation settings
    start = time.perf_counter()
    path = interleave.checkpoint_folder(args.model or EMBEDDED)
    settings, stops = generation_settings(args, path, log)
    model = interleave.load(path, device=device, dtype=dtype, attn=args.attn)
    tokenizer = interleave.load_tokenizer(path)
    log(f"loaded {args.model or 'the embedded tiny model'} ({model.config.layout} layout) "
        f"on {device}, {dtype}, {model.decoder.layers[0].self_attn.impl} attention, "
        f"in {time.perf_counter() - start:.1f} s")
    # The chat template's end tokens (those the tokenizer has) stop an answer too
    chat_ends = {tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")}
    chat_ends.discard(None)
    stops = sorted(chat_ends | set(stops))
    return Session(model, tokenizer, settings, stops, args, log)


def run(args, log):
    # `--views a.png b.png "prompt"`: argparse gave the prompt to --views; it is not an image file
    if args.prompt is None and args.views:
        last = args.views[-1]
        if not os.path.exists(last) and not last.lower().endswith(IMAGE_FILES):
            args.prompt = args.views.pop()

    # `python sample.py --viz out.png`: no question and no images, so the demo's, drawn
    if args.viz and args.prompt is None and not (args.image or args.video or args.views):
        args.demo = True

    # ---- check the options and read the inputs first: a typo should not cost a model load
    check_options(args)
    if args.score:
        score_file(args.score, log)
        return
    device = pick_device(args.device)
    if args.bench:
        bench = read_bench(args.bench, args.image_folder)
        session = load_session(args, device, log)
        return run_bench(session, args, bench, log)
    images = [interleave.open_image(path) for path in args.image]
    names = [os.path.basename(path) for path in args.image]
    if args.video:
        max_frames = frames_that_fit(args.model or EMBEDDED)
        frames = interleave.read_video_frames(args.video, args.num_frames, max_frames)
        images += frames
        names += [f"{os.path.basename(args.video)} frame {i + 1}" for i in range(len(frames))]
    images += [interleave.open_image(path) for path in args.views]
    names += [os.path.basename(path) for path in args.views]
    if args.viz and not args.demo and not images:
        raise interleave.InputError(
            f"--viz {args.viz} draws where the answer looked in each image, and there is none; "
            "give --image, --video or --views, or leave --viz out")
    # The question: an argument, stdin, or (stdin a terminal) the chat's lines, read there
    chatting = not args.demo and args.prompt is None and sys.stdin.isatty()
    prompt = None
    if not args.demo and not chatting:
        if args.prompt is None:
            prompt = read_text("the prompt on stdin")
        else:
            prompt = check_utf8(args.prompt, "the prompt")
        if not prompt:
            raise interleave.InputError("no prompt: give it as an argument or on stdin")

    session = load_session(args, device, log)

    # ---- the demo, a chat, or one question
    if args.demo:
        return demo(session)
    if chatting:
        return chat(session, images, names)
    session.answer([("user", prompt, images)], images, names)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.demo = args.demo or not argv   # no arguments at all: the demo

    def log(message):
        """One line of statistics on stderr, at once; nothing under --quiet."""
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)
    try:
        run(args, log)
    except BrokenPipeError:
        # The reader went away (| head): not an error; silence the final flush too
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (interleave.InputError, interleave.CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
