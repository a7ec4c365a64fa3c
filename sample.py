"""Ask LLaVA-NeXT-Interleave about several images, video frames, the views of a 3D scene or one large image.

  python sample.py                                  # the built-in demo on the embedded tiny model, offline
  python sample.py --model llava-hf/llava-interleave-qwen-0.5b-hf --image a.jpg --image b.png "Compare <image> <image>"
  python sample.py --model PATH --video clip.gif --num-frames 16 "What happens in this video?"
  python sample.py --model PATH --views v1.png v2.png v3.png "How many chairs are in the room?"
  python sample.py --model lmms-lab/llava-next-interleave-qwen-0.5b --image photo.jpg --anyres "What does it say?"

Images go to the model in the order --image, --video frames, --views. Without a prompt, a terminal on stdin starts a
chat (the images stay in the conversation); otherwise stdin is the prompt. The answer streams to stdout, statistics
go to stderr (--quiet silences them). Bad input gives one line on stderr and exit status 2.
"""
import argparse
import contextlib
import json
import os
import sys
import time

import torch
from PIL import Image, ImageDraw

import hub
import interleave

EMBEDDED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "m4-tiny")   # made by train.py
IMAGE_FILES = interleave.FRAME_EXTENSIONS + (".tif", ".tiff")
GREEDY = dict(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=256)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", help="the question; each <image> marks where an image goes (none: in front)")
    p.add_argument("--model", help="a checkpoint folder or a hub id (default: the embedded tiny model)")
    p.add_argument("--demo", action="store_true", help="one question per scenario (the default without arguments)")
    p.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
    p.add_argument("--video", help="an animated GIF/WebP/PNG or a folder of frames; each frame is one image")
    p.add_argument("--num-frames", type=int, default=16, help="frames sampled uniformly from the video (16)")
    p.add_argument("--views", nargs="+", default=[], help="the views of a 3D scene")
    p.add_argument("--anyres", action="store_true", help="multi-patch: cut the one image into tiles (more detail)")
    g = p.add_argument_group("generation (default: greedy, or what the checkpoint's generation_config.json says; "
                             "--temperature above 0 samples, --seed makes it repeatable)")
    for name, kind in (("max-new-tokens", int), ("temperature", float), ("top-k", int), ("top-p", float),
                       ("repetition-penalty", float), ("seed", int)):
        g.add_argument("--" + name, type=kind)
    p.add_argument("--device", help="cuda, mps or cpu (default: the first of these that is available)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="default: bf16 on a GPU, else fp32")
    p.add_argument("--attn", choices=interleave.ATTENTION_IMPLS, help="default: triton on CUDA, else sdpa")
    p.add_argument("--viz", metavar="OUT.png", help="draw where the answer looked in each image")
    p.add_argument("--quiet", action="store_true", help="no statistics on stderr")
    return p.parse_args(argv)


def generation_settings(args, path, log):
    """Greedy, unless the checkpoint's generation_config.json says otherwise; command-line options win over both.
    As in transformers, temperature/top-k/top-p apply only when the file sets do_sample; the penalty always does."""
    settings, stops, file = dict(GREEDY), [], os.path.join(path, "generation_config.json")
    if os.path.isfile(file):
        try:
            with open(file) as f:
                config = json.load(f)
        except ValueError as e:
            raise interleave.CheckpointError(f"{file} is not valid JSON ({e})") from None
        sampling = ("temperature", "top_k", "top_p") if config.get("do_sample") else ()
        keys = ("repetition_penalty", "max_new_tokens", *sampling)
        found = {key: config[key] for key in keys if config.get(key) is not None}
        settings.update(found)
        eos = config.get("eos_token_id")
        stops = eos if isinstance(eos, list) else [] if eos is None else [eos]
        log(f"defaults from {os.path.basename(file)}: " + (", ".join(f"{k} {v}" for k, v in found.items()) or "greedy"))
    settings.update({key: getattr(args, key) for key in settings if getattr(args, key) is not None})
    if settings["max_new_tokens"] < 1:
        raise interleave.InputError(f"--max-new-tokens must be at least 1, not {settings['max_new_tokens']}")
    return settings, stops


class Stream:
    """Prints the answer as its tokens arrive. Byte-level BPE may split one character over several tokens, so the
    tokens so far are decoded as a whole and only the new text is printed, holding back a trailing U+FFFD (an
    unfinished character) until the next token completes it."""

    def __init__(self, tokenizer, stop_ids, out):
        self.tokenizer, self.stop_ids, self.out = tokenizer, set(stop_ids), out
        self.ids, self.shown, self.stopped, self.first_at = [], "", False, None

    def __call__(self, token):
        self.first_at = self.first_at or time.perf_counter()
        self.stopped = self.stopped or int(token[0]) in self.stop_ids
        if not self.stopped:
            self.ids.append(int(token[0]))
            self.flush(final=False)

    def flush(self, final=True):
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if final or not text.endswith("\ufffd"):
            self.out.write(text[len(self.shown):] + "\n" * final)
            self.out.flush()
            self.shown = text
        return text


@contextlib.contextmanager
def recording_attention(prompt_len):
    """For --viz: wraps interleave.attention (looked up at each call) to add up, in every layer at every decoding step,
    the newest token's attention to the prompt, averaged over heads. Yields [sum (prompt_len,), count]."""
    record, inner = [torch.zeros(prompt_len), 0], interleave.attention

    def attention(q, k, v, causal, impl, scale=None, cu_seqlens=None):
        if causal and q.shape[2] == 1:   # a decoding step: one query, the newest token (the tower is not causal)
            keys = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)                      # GQA: (B, H, Tk, D)
            scores = (q.float() @ keys.float().transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
            record[0] += scores.softmax(-1).mean(dim=(0, 1, 2))[:prompt_len].cpu()        # (B, H, 1, Tk) -> (T,)
            record[1] += 1
        return inner(q, k, v, causal, impl, scale, cu_seqlens)

    interleave.attention = attention
    try:
        yield record
    finally:
        interleave.attention = inner


def draw_attention(out_file, images, names, sample, weights, config, log):
    """Red where the answer looked, over a grey copy of each image: the plain image's grid*grid slots, or the tile
    grid of a multi-patch image (its image_newline column dropped). One colour scale for all images."""
    s = config.vision.image_size // config.vision.patch_size
    begin, maps, shares = 0, [], []
    for size in sample.image_sizes:   # each image's slots are contiguous, in image order, with text in between
        n = interleave.image_slots(config, size)
        while int(sample.input_ids[begin]) != config.image_token_id:
            begin += 1
        if size is None:
            maps.append(weights[begin:begin + s * s].view(s, s))
        else:
            _, _, _, (top, bottom, left, right) = interleave.multipatch_layout(size, config)
            maps.append(weights[begin + s * s:begin + n].view(bottom - top, right - left + 1)[:, :-1])
        shares.append(float(weights[begin:begin + n].sum()))
        begin += n
    low, high = min(float(m.min()) for m in maps), max(float(m.max()) for m in maps)
    sheet = Image.new("RGB", (256 * min(len(images), 4), 256 * -(-len(images) // 4)), "white")
    for i, (image, heat, name, share) in enumerate(zip(images, maps, names, shares)):
        image = image.convert("L").convert("RGB")
        image.thumbnail((256, 256))
        alpha = Image.fromarray((200 * (heat - low) / max(high - low, 1e-12)).byte().numpy())
        tile = Image.composite(Image.new("RGB", image.size, "red"), image, alpha.resize(image.size, Image.BILINEAR))
        ImageDraw.Draw(tile).text((4, 4), f"{name} {100 * share:.0f}%", fill="yellow")
        sheet.paste(tile, (256 * (i % 4) + (256 - tile.width) // 2, 256 * (i // 4) + (256 - tile.height) // 2))
    sheet.save(out_file)
    log(f"attention map in {out_file}; the answer's attention on each image: "
        + ", ".join(f"{a} {100 * x:.0f}%" for a, x in zip(names, shares)))


def peak_memory(device):
    if device.type == "cuda":
        return f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    import resource   # ru_maxrss is in KiB on Linux, in bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** (30 if sys.platform == "darwin" else 20)
    return f"peak RSS {rss:.2f} GiB"


class Session:
    """A loaded model with its tokenizer and generation settings; answer() runs one turn of a conversation."""

    def __init__(self, model, tokenizer, settings, stops, args, log):
        self.model, self.tokenizer, self.settings, self.stops, self.args, self.log = (
            model, tokenizer, settings, stops, args, log)

    def answer(self, turns, images, names, before="", out=None):
        """Build the inputs of the conversation so far, stream the answer to out (stdout) and return its text."""
        out, config, settings = out or sys.stdout, self.model.config, self.settings
        device = self.model.decoder.embed_tokens.weight.device
        sample = interleave.build_inputs(turns, self.tokenizer, config, anyres=self.args.anyres)
        n, context = len(sample.input_ids), config.text.max_positions
        if n >= context:
            raise interleave.InputError(f"the prompt takes {n} tokens, more than the model's context of {context}; "
                                        "use fewer images or frames, or a shorter prompt")
        slots = [interleave.image_slots(config, size) for size in sample.image_sizes]
        same = len(set(slots)) == 1 and len(slots) > 2   # video frames, views: one line, not one per image
        self.log(f"{n} prompt tokens, image slots: " + (f"{len(slots)} images x {slots[0]}" if same else
                                                        ", ".join(f"{a} {k}" for a, k in zip(names, slots)) or "none"))
        out.write(before)
        pixels = None if sample.pixel_values is None else sample.pixel_values.to(device)
        generator = None if self.args.seed is None else torch.Generator(device).manual_seed(self.args.seed)
        stream, start = Stream(self.tokenizer, self.stops, out), time.perf_counter()
        with recording_attention(n) if self.args.viz else contextlib.nullcontext() as record:
            new = self.model.generate(sample.input_ids[None].to(device), pixels, sample.image_sizes,
                                      max_new_tokens=min(settings["max_new_tokens"], context - n),
                                      temperature=settings["temperature"], top_k=settings["top_k"],
                                      top_p=settings["top_p"], repetition_penalty=settings["repetition_penalty"],
                                      stop_ids=self.stops, generator=generator, on_token=stream,
                                      cuda_graph=False if self.args.viz else None)   # --viz wraps attention(): no graph
        end, count, text = time.perf_counter(), new.shape[1], stream.flush()
        rate = f", {(count - 1) / (end - stream.first_at):.1f} tokens/s after the first" if count > 1 else ""
        self.log(f"time to first token {stream.first_at - start:.2f} s, {count} tokens{rate}, {peak_memory(device)}")
        if record and record[1]:
            draw_attention(self.args.viz, images, names, sample, record[0] / record[1], config, self.log)
        return text


def demo_inputs():
    """One held-out example of each scenario from the synthetic M4 tasks that the embedded model learned, drawn with
    Pillow by data/make_m4.py: the demo needs no files and no network."""
    from data import make_m4   # as train.py imports it
    for task in make_m4.TASKS:
        images, question, expected = make_m4.make_example(task, seed=0, split="val", index=0)[:3]
        if task == "video":   # as in training: the question's markers sample that many frames, put in front
            images = interleave.read_video_frames(images, question.count(interleave.IMAGE_MARKER))
            question = question.replace(interleave.IMAGE_MARKER, "").lstrip("\n")
        yield task, question, images, task == "multi_patch", expected


def demo(session):
    viz = session.args.viz
    for task, question, images, anyres, expected in demo_inputs():
        if anyres and not session.model.config.has_image_newline:
            session.log(f"({task} skipped: {interleave.MULTIPATCH_NEEDS_NEWLINE})")
            continue
        if viz:   # one picture per scenario: out.png -> out-video.png, ...
            session.args.viz = f"-{task}".join(os.path.splitext(viz))
        session.args.anyres = anyres
        session.answer([("user", question, images)], images, [f"{task} {i + 1}" for i in range(len(images))],
                       before=f"[{task}, expected answer: {expected}]\n{question}\n> ")


def chat(session, images, names):
    session.log(f"chat: {len(images)} images in the first turn; an empty line or Ctrl-D ends the chat")
    turns = []
    while True:
        try:
            text = input("you: ").strip()
        except EOFError:
            break
        if not text:
            break
        turns.append(("user", text, [] if turns else images))
        try:
            turns.append(("assistant", session.answer(turns, images, names, before="model: ")))
        except interleave.InputError as e:   # e.g. markers that do not match the images: say so, let them retype
            print(f"error: {e}", file=sys.stderr)
            turns.pop()


def run(args, log):
    if args.prompt is None and args.views and not os.path.exists(args.views[-1]) and \
            not args.views[-1].lower().endswith(IMAGE_FILES):   # `--views a.png b.png "prompt"`: argparse gave
        args.prompt = args.views.pop()                          # the prompt to --views; it is not an image file
    # Read the inputs first: a typo in a file name should not cost a model load.
    images, names = [interleave.open_image(path) for path in args.image], [os.path.basename(p) for p in args.image]
    if args.video:
        frames = interleave.read_video_frames(args.video, args.num_frames)
        images += frames
        names += [f"{os.path.basename(args.video)} frame {i + 1}" for i in range(len(frames))]
    images += [interleave.open_image(path) for path in args.views]
    names += [os.path.basename(path) for path in args.views]
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"))
    if (device.type == "cuda" and not torch.cuda.is_available()) or (device.type == "mps" and not mps):
        raise interleave.InputError(f"--device {device} is not available here; leave --device out to pick one")
    dtype = getattr(torch, args.dtype) if args.dtype else torch.float32 if device.type == "cpu" else torch.bfloat16
    if args.attn == "triton" and device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")   # the kernel then runs in Triton's interpreter (slow)
    start = time.perf_counter()
    path = hub.local_path(args.model or EMBEDDED)
    model = interleave.load(path, device=device, dtype=dtype, attn=args.attn)
    tokenizer = interleave.load_tokenizer(path)
    log(f"loaded {args.model or 'the embedded tiny model'} ({model.config.layout} layout) on {device}, {dtype}, "
        f"{model.decoder.layers[0].self_attn.impl} attention, in {time.perf_counter() - start:.1f} s")
    settings, stops = generation_settings(args, path, log)
    stops = sorted({tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")} - {None} | set(stops))
    session = Session(model, tokenizer, settings, stops, args, log)
    if args.demo:
        return demo(session)
    if args.prompt is None and sys.stdin.isatty():
        return chat(session, images, names)
    prompt = sys.stdin.read().strip() if args.prompt is None else args.prompt
    if not prompt:
        raise interleave.InputError("no prompt: give it as an argument or on stdin")
    session.answer([("user", prompt, images)], images, names)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.demo = args.demo or not argv
    log = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    try:
        run(args, log)
    except BrokenPipeError:   # the reader went away (| head): not an error; silence the final flush too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (interleave.InputError, interleave.CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
