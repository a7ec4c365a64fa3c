"""LLaVA-NeXT-Interleave (arXiv 2407.07895) from scratch, in one file.

The model reads a stream of text tokens in which some positions are image slots. Pixels go through
a SigLIP vision transformer, a two-layer MLP projects each patch feature into the decoder's width,
the projected vectors replace the slots, and a Qwen2 decoder predicts the next token. Multi-image,
video frames, 3D views and the tiles of one large image are all the same thing to the model: more
slots in the stream. The file reads in that order:

    config -> images (files, multi-patch tiles, video frames)
           -> text (template, conversations, training samples, packing)
           -> attention -> vision transformer -> projector -> splice -> decoder
           -> generation -> checkpoint loader (config.json, safetensors files)

Facts about the released checkpoints (shapes, key names, traps) are in docs/MODEL.md; the comments
cite its sections (§).
"""
import contextlib
import http.client
import io
import json
import math
import os
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer

# ==== 1. Configuration: small dataclasses (section 9 fills them from either release's config.json)

IMAGE_MARKER = "<image>"
# The HF release's <image> token; the original release has none, so it serves there too (§3).
IMAGE_SLOT_ID = 151646
SYSTEM_PROMPT = "You are a helpful assistant."
# The multi-patch canvases, (width, height) in pixels (§4).
GRID_PINPOINTS = ([384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152])


@dataclass
class VisionConfig:
    """SigLIP vision transformer. Defaults: so400m-patch14-384, the tower of every release (§1)."""
    hidden: int = 1152
    intermediate: int = 4304
    heads: int = 16
    layers: int = 26           # as stored in the checkpoint: the loader sets it from the keys
    image_size: int = 384
    patch_size: int = 14
    eps: float = 1e-6
    act: str = "gelu_pytorch_tanh"
    feature_layer: int = -1    # index into (embeddings, layer 1, ..., layer N)

    @property
    def tokens(self):
        """Feature vectors per image: (384 // 14)^2 = 27 * 27 = 729."""
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextConfig:
    """Qwen2 decoder. Defaults are Qwen2's own, which the 7b-hf config.json relies on (§2)."""
    hidden: int = 4096
    intermediate: int = 22016
    heads: int = 32
    kv_heads: int = 32
    head_dim: int = 128
    layers: int = 32
    vocab: int = 151936
    eps: float = 1e-6
    rope_theta: float = 10000.0
    max_positions: int = 32768
    tie_embeddings: bool = False


@dataclass
class ModelConfig:
    vision: VisionConfig
    text: TextConfig
    layout: str   # "original" (lmms-lab, llava_qwen) or "hf" (llava-hf, llava)
    image_token_id: int = IMAGE_SLOT_ID
    projector_bias: bool = True
    grid_pinpoints: list = field(default_factory=lambda: list(GRID_PINPOINTS))
    has_image_newline: bool = False   # only the original release carries `image_newline` (§4.7)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says what is wrong and how to fix it."""


# ==== 2. Images (§4): opening any file, plain views, multi-patch tiles, video frames

class InputError(ValueError):
    """Bad input (an image, a video, a prompt); the message says what is wrong and how to fix it."""


MULTIPATCH_NEEDS_NEWLINE = ("multi-patch (anyres) needs the `image_newline` vector, which only "
                            "the original lmms-lab release carries (the Hugging Face conversion "
                            "dropped it): load an original checkpoint, or pass the image as a "
                            "plain image")


URL_TIMEOUT = 30                 # seconds for a whole download (an image or a video by URL)
IMAGE_URL_MAX_BYTES = 64 << 20   # an image by URL: at most 64 MiB, held in memory
VIDEO_URL_MAX_BYTES = 4 << 30    # a video by URL: at most 4 GiB, written to a temporary file


def is_url(source):
    """An http(s) address rather than a file path."""
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


def fetch_url(url, out, max_bytes):
    """Write what url serves into the file object out, with the standard library. Redirects are
    followed (urllib stops at 10); an HTTP error, no connection, a download that takes more than
    URL_TIMEOUT seconds or a body over max_bytes is one InputError."""
    deadline = time.monotonic() + URL_TIMEOUT
    too_large = f"{url} is larger than {max_bytes >> 20} MiB; download it and give the file"
    timed_out = (f"{url} did not arrive within {URL_TIMEOUT} s; "
                 "check the address, or download it and give the file")
    request = urllib.request.Request(url, headers={"User-Agent": "interleave"})
    try:
        with urllib.request.urlopen(request, timeout=URL_TIMEOUT) as response:
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise InputError(too_large)
            received = 0
            # read1: one network read at a time, so the deadline stops a server that trickles too
            while chunk := response.read1(1 << 16):
                received += len(chunk)
                if received > max_bytes:
                    raise InputError(too_large)
                if time.monotonic() > deadline:
                    raise InputError(timed_out)
                out.write(chunk)
    except urllib.error.HTTPError as e:   # before URLError, its parent
        raise InputError(f"{url} answered HTTP {e.code} {e.reason}; check the address") from None
    except TimeoutError:
        raise InputError(timed_out) from None
    except urllib.error.URLError as e:   # refused, no route, unknown host; or a connect timeout
        if isinstance(e.reason, TimeoutError):
            raise InputError(timed_out) from None
        raise InputError(f"cannot fetch {url} ({e.reason}); "
                         "check the address and the network") from None
    except (OSError, http.client.HTTPException) as e:   # a connection dropped mid-body
        raise InputError(f"fetching {url} failed ({e!r}); try again, "
                         "or download it and give the file") from None


def read_image_file(source):
    """Image.open + load of a path or an http(s) URL, with every way it can fail turned into one
    clear InputError."""
    opened = source
    if is_url(source):
        opened = io.BytesIO()
        fetch_url(source, opened, IMAGE_URL_MAX_BYTES)
        opened.seek(0)
    try:
        image = Image.open(opened)
        image.load()
        return image
    except FileNotFoundError:
        raise InputError(f"{source} does not exist") from None
    except Image.DecompressionBombError as e:   # Pillow's guard against images that exhaust memory
        raise InputError(f"{source} is too large to decode safely ({e}); shrink it first") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"cannot read {source} as an image ({e}); "
                         "is it a complete image file?") from None


def open_image(source):
    """A path, an http(s) URL or a PIL image, in any mode -> RGB PIL image, upright (EXIF
    orientation applied)."""
    image = source if isinstance(source, Image.Image) else read_image_file(source)
    if image.width < 1 or image.height < 1:
        raise InputError(f"image {getattr(image, 'filename', '')} has zero size {image.size}")
    image = ImageOps.exif_transpose(image)   # phones store the rotation in EXIF, not in the pixels
    # 16/32-bit grey: rescale to 8 bits here, as convert("RGB") would clip at 255.
    if image.mode.startswith("I"):
        grey = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or grey.max() > 255:
            grey = grey / 257
        image = Image.fromarray(grey.clip(0, 255).round().astype(np.uint8))
    return image.convert("RGB")   # alpha is dropped, as the release's own .convert("RGB") does


def image_to_pixels(image, size):
    """PIL image -> (3, size, size): bicubic resize ignoring aspect ratio, mean/std 0.5: [-1, 1]."""
    rgb = image.convert("RGB").resize((size, size), Image.BICUBIC)
    raw = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    pixels = raw.view(size, size, 3)                       # (H, W, C)
    pixels = pixels.permute(2, 0, 1).float() / 255.0       # (C, H, W) in [0, 1]
    return (pixels - 0.5) / 0.5                            # (C, H, W) in [-1, 1]


def select_canvas(image_size, pinpoints):
    """§4.1: the (width, height) canvas that keeps the most of the image's resolution, then wastes
    the least. Strict comparisons: on a tie the FIRST best wins (small images: 1 wide x 2 high)."""
    w0, h0 = image_size
    best = None
    best_effective = 0
    best_waste = float("inf")
    for width, height in pinpoints:
        scale = min(width / w0, height / h0)
        # The image's pixels that the resized image keeps, never more than it has.
        effective = min(int(w0 * scale) * int(h0 * scale), w0 * h0)
        waste = width * height - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best = (width, height)
            best_effective = effective
            best_waste = waste
    return best


def multipatch_layout(image_size, config):
    """For a multi-patch image of size (w, h): (views, rows, cols, (top, bottom, left, right)), the
    last being the part of the (rows*s, cols*s) feature grid that unpadding keeps (§4.5, the
    release's float truncation included)."""
    w0, h0 = image_size
    tile = config.vision.image_size
    s = tile // config.vision.patch_size   # features per tile side (27)
    width, height = select_canvas(image_size, config.grid_pinpoints)
    rows = height // tile
    cols = width // tile
    ch = rows * s   # the feature grid's height
    cw = cols * s   # and width
    n_views = 1 + rows * cols   # the base view, then the tiles
    if w0 / h0 > cw / ch:
        # The image is wider than the grid: black bands above and below.
        pad = (ch - int(h0 * (cw / w0))) // 2
        return n_views, rows, cols, (pad, ch - pad, 0, cw)
    # The image is taller: black bands left and right.
    pad = (cw - int(w0 * (ch / h0))) // 2
    return n_views, rows, cols, (0, ch, pad, cw - pad)


def image_slots(config, image_size=None):
    """Slots of one image: grid*grid (729) plain; multi-patch adds the unpadded grid + newlines."""
    if image_size is None:
        return config.vision.tokens
    _, _, _, (top, bottom, left, right) = multipatch_layout(image_size, config)
    return config.vision.tokens + (bottom - top) * (right - left + 1)   # 1000x1000: 729 + 54 * 55


def image_views(config, image_size=None):
    """Views one image sends through the tower: 1 plain; base + tiles multi-patch."""
    if image_size is None:
        return 1
    n_views, _, _, _ = multipatch_layout(image_size, config)
    return n_views


def multipatch_views(image, config):
    """§4.2-4.3: the base view (the whole image) and the tiles of the image fitted onto a black
    canvas, row-major."""
    tile = config.vision.image_size
    w0, h0 = image.size
    width, height = select_canvas(image.size, config.grid_pinpoints)
    # Resize to fit the canvas, keeping the aspect ratio: the side that limits the scale fills it.
    scale_w = width / w0
    scale_h = height / h0
    if scale_w < scale_h:
        new_w = width
        new_h = min(math.ceil(h0 * scale_w), height)
    else:
        new_w = min(math.ceil(w0 * scale_h), width)
        new_h = height
    canvas = Image.new("RGB", (width, height))   # black: -1.0 after normalisation, not the mean
    resized = image.resize((new_w, new_h), Image.BICUBIC)
    canvas.paste(resized, ((width - new_w) // 2, (height - new_h) // 2))   # centred
    # Row-major: the tiles of the top row, left to right, then the next row.
    tiles = [canvas.crop((x, y, x + tile, y + tile))
             for y in range(0, height, tile) for x in range(0, width, tile)]
    return [image] + tiles


def preprocess(image, config, anyres=False):
    """A PIL image (any mode) or path -> (n_views, 3, S, S): one view, or base + tiles (anyres)."""
    if anyres and not config.has_image_newline:
        raise InputError(MULTIPATCH_NEEDS_NEWLINE)
    image = open_image(image)
    views = multipatch_views(image, config) if anyres else [image]
    return torch.stack([image_to_pixels(view, config.vision.image_size) for view in views])


FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi")   # decoded by PyAV (FFmpeg)


def sample_frame_indices(total, num_frames):
    """Uniform sampling, as the official demo: np.linspace(0, total - 1, n, dtype=int). With no
    more frames than asked for, all of them (the demo divides by zero there)."""
    if total <= num_frames:
        return list(range(total))
    return np.linspace(0, total - 1, num_frames, dtype=int).tolist()


def natural_sort_key(name):
    """Sort key for natural name order: digit runs compare as numbers (frame2 before frame10)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def check_frame_budget(where, frames, max_frames):
    """Refuse a video that gives more frames than fit in the model's context (max_frames)."""
    if max_frames is not None and frames > max_frames:
        raise InputError(f"{where} gives {frames} frames, more than the {max_frames} that fit "
                         "in the model's context; ask for fewer frames")


def is_video_file(source):
    """A path or URL whose name ends like a video container (MP4, MOV, WebM, MKV, AVI)."""
    name = urllib.parse.urlsplit(source).path if is_url(source) else os.fspath(source)
    return name.lower().endswith(VIDEO_EXTENSIONS)


def read_video_frames(source, num_frames=16, max_frames=None):
    """num_frames frames sampled uniformly from a video file (MP4, MOV, WebM, MKV, AVI, decoded
    with PyAV), an animated GIF, WebP or PNG, a folder of frames (natural name order), an http(s)
    URL of any of these files, or a list of images or paths. Each frame is one <image> of 729
    slots; none is pooled. max_frames (the frames that fit in the model's context): a video that
    gives more is refused before any frame is decoded."""
    whole = isinstance(num_frames, (int, np.integer)) and not isinstance(num_frames, bool)
    if not whole or num_frames < 1:
        raise InputError(f"num_frames must be a whole number of at least 1, not {shown(num_frames)}")
    if not isinstance(source, (list, tuple)) and is_video_file(source):
        return read_video_file(source, num_frames, max_frames)
    # ---- which frames: file names or frame numbers, nothing decoded yet
    video = None
    if isinstance(source, (list, tuple)):
        frames = list(source)
    elif not is_url(source) and os.path.isdir(source):
        names = sorted(os.listdir(source), key=natural_sort_key)
        frames = [os.path.join(source, name) for name in names
                  if name.lower().endswith(FRAME_EXTENSIONS)]
    else:
        # An animated image file: its frame numbers (opening it decodes the first frame only).
        video = read_image_file(source)
        frames = list(range(getattr(video, "n_frames", 1)))
    if not frames:
        raise InputError(f"no video frames in {source}: "
                         f"expected image files ({', '.join(FRAME_EXTENSIONS)})")
    chosen = [frames[i] for i in sample_frame_indices(len(frames), num_frames)]
    where = "the video" if isinstance(source, (list, tuple)) else str(source)
    check_frame_budget(where, len(chosen), max_frames)
    # ---- decode the chosen frames
    if video is None:
        return [open_image(frame) for frame in chosen]
    decoded = []
    for index in chosen:
        try:
            video.seek(index)
            decoded.append(video.convert("RGB"))
        except (OSError, EOFError, ValueError) as e:
            raise InputError(f"cannot read frame {index} of {source} ({e}); "
                             "is it a complete file?") from None
    return decoded


def read_video_file(source, num_frames, max_frames):
    """read_video_frames for a video container, path or URL (a URL is first downloaded to a
    temporary file). The frame count comes from the header, or where the container has none
    (WebM, MKV) from a first pass that decodes without keeping anything; then the chosen frames
    are decoded, in order, up to the last one. Only the chosen frames are ever kept."""
    if is_url(source):
        suffix = os.path.splitext(urllib.parse.urlsplit(source).path)[1]
        with tempfile.NamedTemporaryFile(suffix=suffix) as file:
            fetch_url(source, file, VIDEO_URL_MAX_BYTES)
            file.flush()
            return read_video_file_as(file.name, source, num_frames, max_frames)
    return read_video_file_as(os.fspath(source), os.fspath(source), num_frames, max_frames)


def read_video_file_as(path, name, num_frames, max_frames):
    """read_video_file for the file at path; messages call it name (its URL, or the path)."""
    container, stream = open_video(path, name)
    with container:
        total = stream.frames   # the header's count; 0 where the container does not say
    if total == 0:
        total = decode_video(path, name, keep=()).decoded
    if total == 0:
        raise InputError(f"{name} has a video stream without any frame; give another video")
    chosen = sample_frame_indices(total, num_frames)
    check_frame_budget(name, len(chosen), max_frames)
    video = decode_video(path, name, keep=chosen)
    if len(video.frames) < len(chosen):
        raise InputError(f"{name} ends after {video.decoded} frames though its header says "
                         f"{total}; is the file truncated?")
    return video.frames


def import_av():
    """PyAV (`pip install av`), imported where a video file needs it."""
    try:
        import av
    except ImportError:
        raise InputError("reading video files needs PyAV: pip install av") from None
    return av


def open_video(path, name):
    """(container, its first video stream), opened with PyAV; InputError for a file that is not
    a video this machine can decode."""
    av = import_av()
    try:
        container = av.open(path)
    except FileNotFoundError:   # PyAV's own FileNotFoundError is this one's subclass
        raise InputError(f"{name} does not exist") from None
    except (av.error.FFmpegError, OSError) as e:
        raise InputError(f"cannot read {name} as a video ({e.strerror or e}); "
                         "is it a complete video file?") from None
    if not container.streams.video:
        kinds = ", ".join(stream.type for stream in container.streams) or "none"
        container.close()
        raise InputError(f"{name} has no video stream (its streams: {kinds}); "
                         "give a file with a video in it")
    stream = container.streams.video[0]
    if stream.codec_context is None:   # FFmpeg knows no decoder for this codec
        container.close()
        raise InputError(f"{name}: its video codec cannot be decoded by this build of PyAV; "
                         "convert the file to H.264 MP4 (ffmpeg -i IN -c:v libx264 OUT.mp4)")
    stream.thread_type = "AUTO"   # decode on every core
    return container, stream


@contextlib.contextmanager
def ffmpeg_errors(av):
    """The list of error messages FFmpeg logs meanwhile, from every thread, repeats included
    (PyAV drops repeats by default); PyAV's log settings are put back after."""
    level = av.logging.get_level()
    skip_repeated = av.logging.get_skip_repeated()
    av.logging.set_level(av.logging.ERROR)
    av.logging.set_skip_repeated(False)
    try:
        with av.logging.Capture(local=False) as log:
            yield log
    finally:
        av.logging.set_level(level)
        av.logging.set_skip_repeated(skip_repeated)


@dataclass
class DecodedVideo:
    frames: list    # the kept frames, RGB PIL images, in order
    decoded: int    # how many frames were decoded in all


def decode_video(path, name, keep):
    """Decode the first video stream from its start. Frames whose index (0, 1, ... in display
    order) is in keep become RGB PIL images; the others are dropped as soon as they are decoded,
    and decoding stops after the last index in keep (keep=(): all are decoded, none kept: a
    count). A truncated or corrupt file is one InputError."""
    av = import_av()
    wanted = set(keep)
    last = max(wanted, default=None)
    video = DecodedVideo(frames=[], decoded=0)
    container, stream = open_video(path, name)
    # FFmpeg reports a Matroska/WebM file cut short only in its log
    try:
        with container, ffmpeg_errors(av) as log:
            for index, frame in enumerate(container.decode(stream)):
                video.decoded = index + 1
                if index in wanted:
                    video.frames.append(frame.to_image())
                if index == last:
                    break
    except av.error.FFmpegError as e:
        raise InputError(f"cannot decode frame {video.decoded} of {name} ({e.strerror or e}); "
                         "is the file complete?") from None
    if any("ended prematurely" in message for _, _, message in log):
        raise InputError(f"{name} ends early, after {video.decoded} frames: "
                         "the file is truncated; give a complete file")
    return video


# ==== 3. Text (§3, §5): tokenizer, ChatML template, conversations -> model inputs, training samples, packing

IGNORE = -100   # the label of every position that carries no loss
# The rules for training labels (§5): "release", as the release computes them (the default), or
# "replies", the loss on the assistant replies and their <|im_end|> only.
LOSS_RULES = ("release", "replies")


def load_tokenizer(path):
    """The `tokenizers` Tokenizer of a checkpoint folder (its tokenizer.json)."""
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise CheckpointError(f"no tokenizer.json in {path}: "
                              "copy it from the release next to config.json")
    try:
        return Tokenizer.from_file(file)
    except Exception as e:
        raise CheckpointError(f"{file} is not a valid tokenizer file ({e}); "
                              "download it again") from None


def chat_segments(turns, system=SYSTEM_PROMPT, add_generation_prompt=None):
    """The ChatML conversation (the release's qwen_1_5 template) as (text, is_reply) segments.

    turns: (role, text) or (role, text, images), roles "user" and "assistant". A turn with images
    but no <image> marker gets them in front of its text (the paper's "in-the-front" format); a
    turn with markers needs exactly one per image. is_reply marks an assistant reply and its
    <|im_end|>: what the "replies" rule labels (§5).
    """
    segments = [(f"<|im_start|>system\n{system}<|im_end|>\n", False)]
    for role, text, *rest in turns:
        markers = text.count(IMAGE_MARKER)
        # A (role, text) turn is template text only: its markers are not checked.
        if rest:
            images = rest[0]
            if images and not markers:
                text = IMAGE_MARKER * len(images) + "\n" + text
            elif markers != len(images):
                raise InputError(f"a {role} turn has {markers} {IMAGE_MARKER} markers but "
                                 f"{len(images)} images; put one marker where each image goes, "
                                 "or none to put them all in front")
        segments.append((f"<|im_start|>{role}\n", False))
        segments.append((text + "<|im_end|>", role == "assistant"))
        segments.append(("\n", False))
    # By default the assistant's turn is opened after a user's turn.
    if add_generation_prompt is None:
        add_generation_prompt = turns[-1][0] == "user"
    if add_generation_prompt:
        segments.append(("<|im_start|>assistant\n", False))
    return segments


def chat_prompt(messages, system=SYSTEM_PROMPT):
    """ChatML text of a question (str) or turns, ending in an open assistant turn after a user's."""
    turns = [("user", messages)] if isinstance(messages, str) else messages
    return "".join(text for text, _ in chat_segments(turns, system))


def encode_prompt(tokenizer, text, image_token_id, slots_per_image):
    """Token ids for text with <image> markers: the text pieces are tokenized separately and each
    marker becomes slots_per_image[i] image slots (an int means the same count for every image)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        # A lone surrogate: invalid UTF-8 decoded with surrogateescape, or a \ud800 escape in JSON.
        raise InputError(f"the text holds {shown(text[e.start])} at character {e.start}, which is "
                         "not valid Unicode; fix the text's encoding (UTF-8)") from None
    pieces = text.split(IMAGE_MARKER)
    if isinstance(slots_per_image, int):
        slots_per_image = [slots_per_image] * (len(pieces) - 1)
    if len(slots_per_image) != len(pieces) - 1:
        raise InputError(f"the prompt has {len(pieces) - 1} {IMAGE_MARKER} markers but "
                         f"{len(slots_per_image)} images were given; "
                         "put one marker where each image goes")
    ids = tokenizer.encode(pieces[0], add_special_tokens=False).ids
    for n_slots, piece in zip(slots_per_image, pieces[1:]):
        ids += [image_token_id] * n_slots
        ids += tokenizer.encode(piece, add_special_tokens=False).ids
    return ids


def newline_id(tokenizer):
    """The id of a lone newline, the token of a "\\n" that the tokenizer did not merge with its
    neighbours: 198 in Qwen's vocabulary, "Ċ" in any byte-level BPE. None if a newline alone is not
    one token."""
    ids = tokenizer.encode("\n", add_special_tokens=False).ids
    return ids[0] if len(ids) == 1 else None


def unmask_everywhere(ids, labels, tokenizer):
    """The last step of the release's labels (§5): every <|im_start|>, every <|im_end|> and every
    lone newline is labelled wherever it stands, in the system and user turns too."""
    kept = {tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>"),
            newline_id(tokenizer)}
    return [t if t in kept else label for t, label in zip(ids, labels)]


@dataclass
class Sample:
    """Model inputs for one conversation, or for several packed into one sequence that never see
    each other."""
    input_ids: torch.Tensor        # (T,) with image_token_id at every image slot
    labels: torch.Tensor           # (T,) the token where the loss applies, IGNORE elsewhere
    pixel_values: torch.Tensor     # (views, 3, S, S) of all images in slot order, or None
    image_sizes: list              # per image: None (plain) or its (w, h) (multi-patch)
    position_ids: torch.Tensor = None   # packed: (T,) restarting at 0 for each sample
    cu_seqlens: torch.Tensor = None     # packed: (n + 1,) int32 sample boundaries 0 .. T
    first_reply: int = None             # where the first assistant reply starts (None: no reply)


def build_inputs(turns, tokenizer, config, system=SYSTEM_PROMPT, anyres=False,
                 add_generation_prompt=None, check_context=True, loss_on="release"):
    """A conversation (see chat_segments; images as PIL images or paths) -> Sample. Multi-image,
    video frames and 3D views are all just several images; anyres cuts a conversation's single
    image into tiles (§4). check_context: refuse a conversation longer than the model's context
    before any pixel is decoded (training truncates instead, and passes False). loss_on: the rule
    of the labels, one of LOSS_RULES (§5); they never fall on an image slot."""
    if loss_on not in LOSS_RULES:
        raise InputError(f"loss_on={loss_on!r}: the labels' rule is one of {', '.join(LOSS_RULES)}")
    segments = chat_segments(turns, system, add_generation_prompt)
    # ---- the images of every turn, in order, and the slots each takes
    images = []
    for _, _, *rest in turns:
        if rest:
            images.extend(rest[0])
    if anyres and len(images) != 1:
        raise InputError(f"multi-patch (anyres) is for a single image; "
                         f"this conversation has {len(images)}")
    # A plain image's slots are known without its pixels; a multi-patch image's need its size.
    sizes = [None] * len(images)
    if anyres:
        images = [open_image(images[0])]
        sizes = [images[0].size]
    slots = [image_slots(config, size) for size in sizes]
    # ---- the token ids, segment by segment, and their labels (§5)
    # The role of each segment's turn: the system's one segment, then three per turn (header, text
    # and <|im_end|>, newline), then the generation prompt, an assistant turn just opened.
    roles = ["system"] + [turn[0] for turn in turns for _ in range(3)] + ["assistant"]
    ids = []
    labels = []
    first_reply = None
    unplaced = slots   # the slot counts of the images not yet placed
    for (text, is_reply), role in zip(segments, roles):
        n_images = text.count(IMAGE_MARKER)
        piece = encode_prompt(tokenizer, text, config.image_token_id, unplaced[:n_images])
        unplaced = unplaced[n_images:]
        if is_reply and first_reply is None:
            first_reply = len(ids)
        ids += piece
        # replies: a reply and its <|im_end|>; release: the whole assistant turn, header to newline
        labelled = is_reply if loss_on == "replies" else role == "assistant"
        labels += [t if labelled and t != config.image_token_id else IGNORE for t in piece]
    if loss_on == "release":
        labels = unmask_everywhere(ids, labels, tokenizer)
    context = config.text.max_positions
    if check_context and len(ids) > context:
        raise InputError(f"the conversation takes {len(ids)} tokens ({sum(slots)} image slots for "
                         f"{len(images)} images), more than the model's context of {context}; "
                         "use fewer images or frames, or a shorter prompt")
    # ---- the pixels, decoded only now
    pixels = [preprocess(image, config, anyres) for image in images]
    pixel_values = torch.cat(pixels) if pixels else None
    return Sample(torch.tensor(ids), torch.tensor(labels), pixel_values, sizes,
                  first_reply=first_reply)


ROLES = {"human": "user", "gpt": "assistant"}   # a record's speakers -> our role names


def record_turn(name, i, turn):
    """Turn i of the record called name, {"from": "human" or "gpt", "value": text} -> (role, text);
    InputError for any other shape."""
    if not isinstance(turn, dict):
        raise InputError(f"{name}: turn {i} is {shown(turn)}, not an object "
                         '{"from": "human" or "gpt", "value": text}')
    for key in ("from", "value"):
        if key not in turn:
            raise InputError(f"{name}: turn {i} has no {key!r}")
    speaker = turn["from"]
    if not isinstance(speaker, str) or speaker not in ROLES:
        raise InputError(f"{name}: turn {i} has 'from': {shown(speaker)}; "
                         "expected 'human' or 'gpt'")
    if not isinstance(turn["value"], str):
        raise InputError(f"{name}: turn {i}'s 'value' must be a string, "
                         f"not {shown(turn['value'])}")
    return ROLES[speaker], turn["value"]


def record_turns(name, record):
    """The (role, text) turns of the conversations of the record called name; InputError for a
    missing, empty or malformed list."""
    conversations = record.get("conversations")
    if conversations is None:
        raise InputError(f"{name} has no conversations")
    if not isinstance(conversations, list):
        raise InputError(f"{name}: conversations must be a list of turns, "
                         f"not {shown(conversations)}")
    if not conversations:
        raise InputError(f"{name}: conversations is empty")
    return [record_turn(name, i, turn) for i, turn in enumerate(conversations)]


def record_media(name, record):
    """A record's video path (or None) and list of image paths, checked to be strings."""
    video = record.get("video")
    images = record.get("image") or []   # "", [] or null: no images
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise InputError(f"{name}: 'image' must be a path or a list of paths, "
                         f"not {shown(record['image'])}")
    if video is not None and (not isinstance(video, str) or not video):
        raise InputError(f"{name}: 'video' must be a path (a folder of frames or a file), "
                         f"not {shown(video)}")
    if video is not None and images:
        raise InputError(f"{name} has both 'video' and 'image'; give one or the other")
    return video, images


def media_path(name, image_folder, path, allow_outside=False):
    """image_folder/path for a record's image or video. Unless allow_outside, an absolute path, or
    one that climbs out of image_folder with .., is refused: a record must not read any file it
    likes. (Links inside the folder are followed: they are the folder owner's choice.)"""
    if allow_outside:
        return os.path.join(image_folder, path)
    fix = "give it relative to the image folder, or move the file into it"
    if os.path.isabs(path):
        raise InputError(f"{name}: media path {path!r} is absolute; {fix} ({image_folder})")
    normal = os.path.normpath(path)
    if normal.split(os.sep)[0] == os.pardir:
        raise InputError(f"{name}: media path {path!r} climbs out of the image folder "
                         f"{image_folder} with ..; {fix}")
    return os.path.join(image_folder, normal)


def record_to_sample(record, image_folder, tokenizer, config, max_len=None, num_frames=16,
                     anyres=False, allow_outside=False, loss_on="release"):
    """An M4-Instruct / LLaVA record (§5) -> Sample, truncated to max_len tokens, its labels by the
    rule loss_on: "release" (the default) or "replies" (see build_inputs). Raises InputError for a
    record that cannot be used (the caller skips and counts it): a malformed one, or one whose
    media paths leave image_folder (allowed only with allow_outside)."""
    # ---- the turns, in our role names
    if not isinstance(record, dict):
        raise InputError(f"record {shown(record)} is not a JSON object "
                         '{"id": ..., "conversations": [...]}')
    name = f"record {shown(record.get('id'))}"
    turns = record_turns(name, record)
    markers = [text.count(IMAGE_MARKER) for _, text in turns]
    # ---- the images: a video's sampled frames, or the image files
    video, images = record_media(name, record)
    if video is not None:
        # One <image> per frame; a short video has fewer, so its frames go in front instead.
        video = media_path(name, image_folder, video, allow_outside)
        images = read_video_frames(video, sum(markers) or num_frames)
        turns = [(role, text.replace(IMAGE_MARKER, "").lstrip("\n")) for role, text in turns]
        markers = [0] * len(turns)
    else:
        images = [media_path(name, image_folder, path, allow_outside) for path in images]
    if sum(markers) not in (0, len(images)):
        raise InputError(f"{name} has {sum(markers)} {IMAGE_MARKER} "
                         f"markers, {len(images)} images")
    # ---- each turn with its own images
    if not sum(markers):
        # No markers at all: every image goes in front of the first turn.
        markers[0] = len(images)
    starts = np.cumsum([0] + markers).tolist()
    turns = [(role, text, images[starts[i]:starts[i + 1]]) for i, (role, text) in enumerate(turns)]
    # Not checked against the context here: truncate() cuts the sample to max_len.
    sample = build_inputs(turns, tokenizer, config, anyres=anyres and len(images) == 1,
                          add_generation_prompt=False, check_context=False, loss_on=loss_on)
    return truncate(sample, max_len, config) if max_len else sample


def truncate(sample, max_len, config):
    """Cut a sample to max_len tokens in its text only: a cut inside an image's slots moves back to
    before that image, and the images past the cut go with it. A sample cut before its first reply
    raises InputError: it would teach nothing of an answer (by the release's rule its system and
    user turns still hold labels, the template's tokens, which alone would hide a --budget too
    small)."""
    ids = sample.input_ids
    cut = min(max_len, len(ids))
    slot = (ids == config.image_token_id).tolist() + [False]
    while cut > 0 and slot[cut] and slot[cut - 1]:
        cut -= 1
    no_reply = sample.first_reply is None or cut <= sample.first_reply
    if no_reply or not (sample.labels[:cut] != IGNORE).any():
        raise InputError(f"sample of {len(ids)} tokens has no answer left within max_len {max_len}")
    # The images whose slots lie before the cut, and their views.
    kept_slots = sum(slot[:cut])
    n_images = 0
    while kept_slots > 0:
        kept_slots -= image_slots(config, sample.image_sizes[n_images])
        n_images += 1
    n_views = sum(image_views(config, size) for size in sample.image_sizes[:n_images])
    pixel_values = sample.pixel_values[:n_views] if n_images else None
    return Sample(ids[:cut], sample.labels[:cut], pixel_values, sample.image_sizes[:n_images],
                  first_reply=sample.first_reply)


def pack_samples(samples, budget, verbose=True):
    """Pack samples into Samples of at most budget tokens, with position_ids and cu_seqlens (§5):
    first-fit, longest first, no padding; each sample's first label is IGNORE in the pack. Prints
    the efficiency: real tokens / (packs x budget)."""
    # ---- first fit: each sample, longest first, goes into the first pack with room for it
    bins = []   # the samples of each pack
    room = []   # the tokens each pack can still take
    for sample in sorted(samples, key=lambda sample: -len(sample.input_ids)):
        n = len(sample.input_ids)
        if n > budget:
            raise InputError(f"a sample of {n} tokens exceeds the packing budget of {budget}; "
                             "truncate it first")
        j = next((j for j, free in enumerate(room) if free >= n), len(bins))
        if j == len(bins):   # no pack has room: open a new one
            bins.append([])
            room.append(budget)
        bins[j].append(sample)
        room[j] -= n
    # ---- each pack as one Sample; positions restart and attention stays within each sample
    packs = []
    for group in bins:
        lengths = [len(sample.input_ids) for sample in group]
        pixels = [sample.pixel_values for sample in group if sample.pixel_values is not None]
        # No position of a sample predicts its first token. In a pack the previous sample's last one
        # would, so that label goes (the release's rule gives one there, <|im_start|>, §5).
        labels = [sample.labels.clone() for sample in group]
        for sample_labels in labels:
            sample_labels[:1] = IGNORE
        packs.append(Sample(
            input_ids=torch.cat([sample.input_ids for sample in group]),
            labels=torch.cat(labels),
            pixel_values=torch.cat(pixels) if pixels else None,
            image_sizes=[size for sample in group for size in sample.image_sizes],
            position_ids=torch.cat([torch.arange(n) for n in lengths]),
            cu_seqlens=torch.tensor(np.cumsum([0] + lengths), dtype=torch.int32),
        ))
    if verbose and packs:
        real = sum(len(sample.input_ids) for sample in samples)
        print(f"packed {len(samples)} samples into {len(packs)} sequences of {budget} tokens: "
              f"{100 * real / (len(packs) * budget):.1f}% real tokens")
    return packs


# ==== 4. Attention: one function, three interchangeable paths

ATTENTION_IMPLS = ("plain", "sdpa", "triton")


def visibility(tq, tk, causal, cu_seqlens, device):
    """Which keys each query may see, (Tq, Tk) bool, or None when it sees them all.

    Causal: with a KV cache the Tq queries are the LAST Tq of the Tk positions, so the mask is
    aligned bottom-right (query i sees key j iff j <= i + Tk - Tq). Packed samples (cu_seqlens, the
    sample boundaries): a query sees only its own sample's keys.
    """
    visible = None
    if causal:
        visible = torch.ones(tq, tk, dtype=torch.bool, device=device).tril(tk - tq)   # (Tq, Tk)
    if cu_seqlens is not None:
        sample_numbers = torch.arange(len(cu_seqlens) - 1, device=device)
        sample = torch.repeat_interleave(sample_numbers, cu_seqlens.diff())   # (T,) sample of each
        same = sample[:, None] == sample[None, :]                                    # (T, T)
        visible = same if visible is None else visible & same
    return visible


def plain_attention(q, k, v, visible, scale):
    """The explanation and the test oracle. q (B, H, Tq, D); k, v (B, Hkv, Tk, D); visible (Tq, Tk)
    or None.

    Grouped-query attention: query head h reads kv head h // (H / Hkv).
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)                          # (B, H, Tk, D)
    v = v.repeat_interleave(group, dim=1)                          # (B, H, Tk, D)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale     # (B, H, Tq, Tk)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    probs = scores.softmax(dim=-1)                                 # softmax in float32 (§1)
    # A query that sees no key (more queries than keys, causal) gets zeros, as SDPA and the
    # kernel give, not the NaN of a softmax over nothing.
    probs = probs.nan_to_num(0.0)                                  # (B, H, Tq, Tk)
    return (probs @ v.float()).to(q.dtype)                         # (B, H, Tq, D)


def attention(q, k, v, causal, impl, scale=None, cu_seqlens=None):
    """Dispatch to impl: "plain" (above), "sdpa" (PyTorch's fused kernel), "triton" (kernels.py)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    b, h, tq, d = q.shape
    tk = k.shape[2]
    if impl == "plain":
        return plain_attention(q, k, v, visibility(tq, tk, causal, cu_seqlens, q.device), scale)
    if impl == "sdpa":
        # SDPA's is_causal aligns the mask top-left: fine for Tq == Tk or one query, else pass the
        # mask itself.
        simple = cu_seqlens is None and (tq == tk or tq == 1)
        mask = None if simple else visibility(tq, tk, causal, cu_seqlens, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                              is_causal=simple and causal and tq > 1,
                                              scale=scale, enable_gqa=True)
    if impl == "triton":
        # The hand-written flash attention. It takes the packed layout: all tokens in one
        # sequence, with the boundaries of the segments in cu_seqlens.
        # No call reads a tensor from the GPU: packed samples need no maximum length, and batch
        # rows pass theirs, known here.
        import kernels
        cu_q = cu_k = None   # one sequence
        longest = {}
        if cu_seqlens is not None:
            cu_q = cu_k = cu_seqlens.to(torch.int32)
        elif b > 1:   # each batch row becomes one segment of the packed layout
            cu_q = torch.arange(0, (b + 1) * tq, tq, dtype=torch.int32, device=q.device)
            cu_k = torch.arange(0, (b + 1) * tk, tk, dtype=torch.int32, device=q.device)
            longest = dict(max_seqlen_q=tq, max_seqlen_k=tk)
        hkv = k.shape[1]
        packed_q = q.transpose(1, 2).reshape(b * tq, h, d)     # (B*Tq, H, D)
        packed_k = k.transpose(1, 2).reshape(b * tk, hkv, d)   # (B*Tk, Hkv, D)
        packed_v = v.transpose(1, 2).reshape(b * tk, hkv, d)   # (B*Tk, Hkv, D)
        out = kernels.attention(packed_q, packed_k, packed_v, causal=causal,
                                cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, scale=scale,
                                **longest)                     # (B*Tq, H, D)
        return out.view(b, tq, h, d).transpose(1, 2)           # (B, H, Tq, D)
    raise ValueError(f"unknown attention implementation {impl!r}: use one of {ATTENTION_IMPLS}")


class SelfAttention(nn.Module):
    """Multi-head attention with q/k/v/output projections, shared by the vision tower and the
    decoder.

    Key names follow the checkpoints: SigLIP calls the output projection out_proj (with bias),
    Qwen2 o_proj (none).
    """

    def __init__(self, dim, heads, kv_heads, head_dim, out_name, out_bias, causal):
        super().__init__()
        self.heads = heads
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.causal = causal
        self.impl = "sdpa"   # set_attention chooses
        self.q_proj = nn.Linear(dim, heads * head_dim)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim)
        self.out_name = out_name
        setattr(self, out_name, nn.Linear(heads * head_dim, dim, bias=out_bias))

    def forward(self, x, rotary=None, cache=None, layer=0, start=0, cu_seqlens=None):
        b, t, _ = x.shape
        h = self.heads
        hkv = self.kv_heads
        d = self.head_dim
        q = self.q_proj(x).view(b, t, h, d).transpose(1, 2)      # (B, H, T, D)
        k = self.k_proj(x).view(b, t, hkv, d).transpose(1, 2)    # (B, Hkv, T, D)
        v = self.v_proj(x).view(b, t, hkv, d).transpose(1, 2)    # (B, Hkv, T, D)
        if rotary is not None:
            q = apply_rotary(q, *rotary)
            k = apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)               # (B, Hkv, start + T, D)
        if torch.is_tensor(start):
            # The fixed-shape decode step: the cache gave back all its positions, and the one
            # query, at position start, sees the keys up to it.
            visible = torch.arange(k.shape[2], device=k.device) <= start   # (max_len,)
            out = plain_attention(q, k, v, visible, d ** -0.5)             # (B, H, 1, D)
        else:
            out = attention(q, k, v, self.causal, self.impl, cu_seqlens=cu_seqlens)   # (B, H, T, D)
        out = out.transpose(1, 2).reshape(b, t, h * d)            # (B, T, H * D)
        return getattr(self, self.out_name)(out)


# ==== 5. Vision transformer: SigLIP so400m-patch14-384, cut to the 26 stored layers, no pooling head (§1)

class VisionBlock(nn.Module):
    """Pre-norm transformer block: x += attn(LN1(x)); x += fc2(gelu_tanh(fc1(LN2(x))))."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden, eps=c.eps)
        self.self_attn = SelfAttention(c.hidden, c.heads, c.heads, c.hidden // c.heads,
                                       out_name="out_proj", out_bias=True, causal=False)
        self.layer_norm2 = nn.LayerNorm(c.hidden, eps=c.eps)
        self.fc1 = nn.Linear(c.hidden, c.intermediate)
        self.fc2 = nn.Linear(c.intermediate, c.hidden)
        self.approximate = "tanh" if c.act == "gelu_pytorch_tanh" else "none"

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        h = self.fc1(self.layer_norm2(x))
        return x + self.fc2(F.gelu(h, approximate=self.approximate))


class VisionTower(nn.Module):
    """Pixels (N, 3, S, S) -> patch features (N, grid*grid, C): the output of the selected layer."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.config = c
        # Stored as a stride-14 convolution: a linear map of each 14x14 patch
        # (384 = 27*14 + 6: the last 6 are dropped).
        self.patch_embedding = nn.Conv2d(3, c.hidden, kernel_size=c.patch_size, stride=c.patch_size)
        self.position_embedding = nn.Embedding(c.tokens, c.hidden)
        self.layers = nn.ModuleList(VisionBlock(c) for _ in range(c.layers))
        if not -(c.layers + 1) <= c.feature_layer <= c.layers:
            raise CheckpointError(f"vision_feature_layer {c.feature_layer} is out of range "
                                  f"for {c.layers} layers")
        # Stored in every checkpoint but NOT applied: the features are taken before it (applying
        # it is the classic bug).
        self.post_layernorm = nn.LayerNorm(c.hidden, eps=c.eps)

    def forward(self, pixels):
        p = self.config.patch_size
        g = self.config.image_size // p   # patches per side (27)
        w = self.patch_embedding.weight   # (C, 3, p, p)
        # ---- patch embedding
        # Computed as the matmul that the convolution is: on a GPU cuDNN runs fp32 convolutions in
        # TF32 by default (off by 2e-3), not matmuls.
        x = pixels.to(w.dtype)[:, :, :g * p, :g * p]               # (N, 3, g*p, g*p)
        x = x.unflatten(2, (g, p)).unflatten(4, (g, p))            # (N, 3, g, p, g, p)
        # Row-major patches, each flattened in the weight's (RGB, y, x) order.
        x = x.permute(0, 2, 4, 1, 3, 5)                            # (N, g, g, 3, p, p)
        x = x.flatten(3).flatten(1, 2)                             # (N, g*g, 3*p*p)
        x = F.linear(x, w.flatten(1), self.patch_embedding.bias)   # (N, g*g, C)
        x = x + self.position_embedding.weight                     # (N, g*g, C)
        # ---- the layers up to the selected one
        # feature_layer indexes (embeddings, layer 1, ..., layer N): -1 is the last layer, -2 the
        # one before it. Layers past the selected one are never run.
        n_run = self.config.feature_layer % (len(self.layers) + 1)
        for layer in self.layers[:n_run]:
            x = layer(x)
        return x


# ==== 6. Projector ("mlp2x_gelu"): Linear -> exact (erf) GELU -> Linear, from vision width to decoder width (§1)

class Projector(nn.Module):
    """Maps each vision feature to one decoder-width vector, which then fills one image slot."""

    def __init__(self, vision_dim, text_dim, bias=True):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, text_dim, bias=bias)
        self.linear_2 = nn.Linear(text_dim, text_dim, bias=bias)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x)))   # exact GELU, unlike the tower's tanh form


# ==== 7. Decoder: Qwen2 (Qwen1.5-Chat) with RMSNorm, rotary embeddings, GQA and a preallocated KV cache (§1)

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps), times a learned weight per channel."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in float32, cast back, THEN scale by the weight: order matters in bf16 (§1).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_tables(positions, head_dim, theta, dtype):
    """cos, sin (B, 1, T, D) for integer positions (B, T); angles in float32, never in bf16."""
    dims = torch.arange(0, head_dim, 2, device=positions.device).float()   # (D/2,)
    inv_freq = 1.0 / theta ** (dims / head_dim)                            # (D/2,)
    angles = positions.float()[..., None] * inv_freq                       # (B, T, D/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]                  # (B, 1, T, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x, cos, sin):
    """Rotate-half convention: the pairs are (i, i + D/2), not interleaved neighbours."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def kv_cache_bytes(text, batch, positions, dtype):
    """The bytes of a KVCache: keys and values of every layer, for batch rows of positions."""
    per_position = 2 * text.layers * text.kv_heads * text.head_dim * dtype.itemsize
    return per_position * batch * positions


def device_memory_bytes(device):
    """The memory an allocation may take on device: what is free on a GPU, the machine's RAM on
    the CPU, None where it cannot be told (then nothing is refused)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    if device.type != "cpu":
        return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):   # no sysconf (Windows)
        return None


def check_kv_cache_fits(text, batch, prompt, max_new_tokens, weight):
    """Refuse, before allocating it, a KV cache larger than the memory of weight's device."""
    needed = kv_cache_bytes(text, batch, prompt + max_new_tokens, weight.dtype)
    memory = device_memory_bytes(weight.device)
    if memory is not None and needed > memory:
        gib = 2 ** 30
        raise InputError(f"the KV cache for {prompt} prompt tokens + max_new_tokens "
                         f"{max_new_tokens} (batch {batch}) needs {needed / gib:.1f} GiB, more "
                         f"than the {memory / gib:.1f} GiB of memory on {weight.device}; "
                         "ask for fewer new tokens or give a shorter prompt")


class KVCache:
    """Keys and values of every layer, preallocated to max_len and indexed by position."""

    def __init__(self, layers, batch, kv_heads, max_len, head_dim, dtype, device):
        self.k = torch.zeros(layers, batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, layer, start, k, v):
        """Write one layer's k, v (B, Hkv, T, D) at positions start .. start+T-1; return that
        layer's keys and values up to the last one written."""
        if torch.is_tensor(start):
            # The fixed-shape decode step: start (1,) lives on the device, and ALL max_len slots
            # come back, so that every step has the same shapes; attention masks those past start.
            keys = self.k[layer].index_copy_(2, start, k)          # (B, Hkv, max_len, D)
            values = self.v[layer].index_copy_(2, start, v)        # (B, Hkv, max_len, D)
            return keys, values
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]   # (B, Hkv, end, D)


class DecoderBlock(nn.Module):
    """Pre-norm: x += attn(input_layernorm(x)); x += SwiGLU MLP(post_attention_layernorm(x))."""

    def __init__(self, c: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden, c.eps)
        self.self_attn = SelfAttention(c.hidden, c.heads, c.kv_heads, c.head_dim,
                                       out_name="o_proj", out_bias=False, causal=True)
        self.post_attention_layernorm = RMSNorm(c.hidden, c.eps)
        self.gate_proj = nn.Linear(c.hidden, c.intermediate, bias=False)
        self.up_proj = nn.Linear(c.hidden, c.intermediate, bias=False)
        self.down_proj = nn.Linear(c.intermediate, c.hidden, bias=False)

    def forward(self, x, rotary, cache, layer, start, cu_seqlens):
        x = x + self.self_attn(self.input_layernorm(x), rotary, cache, layer, start, cu_seqlens)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Decoder(nn.Module):
    """The blocks and the final norm; the caller embeds the tokens (and splices in the images)."""

    def __init__(self, c: TextConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab, c.hidden)
        self.layers = nn.ModuleList(DecoderBlock(c) for _ in range(c.layers))
        self.norm = RMSNorm(c.hidden, c.eps)

    def forward(self, x, positions, cache=None, start=0, cu_seqlens=None):
        rotary = rotary_tables(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, rotary, cache, i, start, cu_seqlens)
        return self.norm(x)


# ==== 8. The whole model: encode images, splice them into the token stream, decode, generate

class LlavaInterleave(nn.Module):
    """LLaVA-NeXT-Interleave: SigLIP tower + mlp2x_gelu projector + Qwen2 decoder. input_ids (B, T)
    carry config.image_token_id at every image slot; pixel_values (N, 3, S, S) hold the images in
    slot order."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision = VisionTower(config.vision)
        self.projector = Projector(config.vision.hidden, config.text.hidden, config.projector_bias)
        if config.has_image_newline:   # used only by multi-patch images (§4.6)
            self.image_newline = nn.Parameter(torch.zeros(config.text.hidden))
        self.decoder = Decoder(config.text)
        self.lm_head = nn.Linear(config.text.hidden, config.text.vocab, bias=False)
        if config.text.tie_embeddings:   # 0.5B: no lm_head tensor in the files, reuse the embedding
            self.lm_head.weight = self.decoder.embed_tokens.weight

    def set_attention(self, impl):
        """Choose the attention path of every layer: "plain", "sdpa" or "triton"."""
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention implementation {impl!r}: "
                             f"use one of {ATTENTION_IMPLS}")
        for module in self.modules():
            if isinstance(module, SelfAttention):
                module.impl = impl
        return self

    def encode_image(self, pixels, image_size=None):
        """The projected vectors exactly as they are spliced into the sequence, (n_slots, H).

        Without image_size: pixels (N, 3, S, S) are N plain images, grid*grid vectors each. With
        image_size = (w, h) of the original image: pixels are the views of ONE multi-patch image
        (base view, then the tiles, §4).
        """
        return self.encode_images(pixels, None if image_size is None else [image_size])

    def encode_images(self, pixels, image_sizes=None):
        """Features of several images whose views are stacked in pixels; image_sizes[i]: None for a
        plain image, (w, h) for a multi-patch one. All views go through the tower in one batch."""
        size = self.config.vision.image_size
        if pixels.dim() != 4 or pixels.shape[1:] != (3, size, size):
            raise ValueError(f"pixel_values must have shape (N, 3, {size}, {size}); "
                             f"got {tuple(pixels.shape)}")
        sizes = image_sizes or []
        multipatch = any(image_size is not None for image_size in sizes)
        if multipatch and not self.config.has_image_newline:
            raise ValueError(MULTIPATCH_NEEDS_NEWLINE)
        n_views = [image_views(self.config, image_size) for image_size in sizes]
        if image_sizes is not None and sum(n_views) != len(pixels):
            raise ValueError(f"image_sizes describe {sum(n_views)} views "
                             f"but pixel_values hold {len(pixels)}")
        views = self.projector(self.vision(pixels))          # (views, grid*grid, H)
        if image_sizes is None:
            return views.flatten(0, 1)                       # (views * grid*grid, H)
        # Each image's views -> the vectors of its slots.
        features = []
        for image, image_size in zip(views.split(n_views), image_sizes):
            if image_size is None:
                features.append(image[0])                    # (grid*grid, H)
            else:
                features.append(self.merge_tiles(image, image_size))
        return torch.cat(features)                           # (n_slots, H)

    def merge_tiles(self, views, image_size):
        """Multi-patch features (§4.4-4.6): base view first, then the tile grid, unpadded, with
        image_newline closing every row. views (1 + rows*cols, s*s, H) ->
        (s*s + rows' * (cols' + 1), H)."""
        _, rows, cols, (top, bottom, left, right) = multipatch_layout(image_size, self.config)
        s = self.config.vision.image_size // self.config.vision.patch_size
        h = views.shape[-1]
        tiles = views[1:].view(rows, cols, s, s, h)                # (rows, cols, s, s, H)
        grid = tiles.permute(4, 0, 2, 1, 3)                        # (H, rows, s, cols, s)
        grid = grid.reshape(h, rows * s, cols * s)                 # (H, rows*s, cols*s)
        grid = grid[:, top:bottom, left:right]                     # unpad: (H, rows', cols')
        newline = self.image_newline.to(grid.dtype)[:, None, None]   # (H, 1, 1)
        newline = newline.expand(h, grid.shape[1], 1)              # (H, rows', 1)
        grid = torch.cat([grid, newline], dim=2)                   # (H, rows', cols' + 1)
        return torch.cat([views[0], grid.flatten(1).T])            # (s*s + rows' * (cols' + 1), H)

    def embed(self, input_ids, pixel_values=None, image_sizes=None):
        """Token embeddings with the image slots replaced, in order, by the image features (§3)."""
        slots = input_ids == self.config.image_token_id                    # (B, T)
        text_ids = input_ids.masked_fill(slots, 0)   # not looked up: 151646 may lie past the vocab
        vocab = self.config.text.vocab
        if text_ids.numel() and (text_ids.min() < 0 or text_ids.max() >= vocab):
            raise ValueError(f"input_ids hold token ids outside [0, {vocab}): "
                             f"min {text_ids.min().item()}, max {text_ids.max().item()}")
        x = self.decoder.embed_tokens(text_ids)                            # (B, T, H)
        n_slots = int(slots.sum())
        if pixel_values is None:
            if n_slots:
                raise ValueError(f"input_ids have {n_slots} image slots "
                                 "but no pixel_values were given")
            return x
        features = self.encode_images(pixel_values, image_sizes)           # (n_slots, H)
        if features.shape[0] != n_slots:
            per = self.config.vision.tokens
            raise ValueError(f"input_ids have {n_slots} image slots but the images give "
                             f"{features.shape[0]} features ({pixel_values.shape[0]} views; "
                             f"{per} per plain image)")
        # The paper's interleaving: the features fill the slots row-major, in slot order.
        return x.masked_scatter(slots[..., None], features.to(x.dtype))   # (B, T, H)

    def forward(self, input_ids, pixel_values=None, image_sizes=None, position_ids=None,
                cu_seqlens=None, cache=None, start=0, last_only=False):
        """Logits (B, T, vocab), or (B, 1, vocab) with last_only. With a cache, input_ids are the
        tokens at positions start .. start+T-1. Packed training sequences (B = 1): position_ids
        restart at 0 for each sample and cu_seqlens (n + 1,) holds the sample boundaries, so
        attention stays inside each sample."""
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(start, start + t, device=input_ids.device)
            position_ids = position_ids.expand(b, t)                         # (B, T)
        x = self.embed(input_ids, pixel_values, image_sizes)                 # (B, T, H)
        hidden = self.decoder(x, position_ids, cache, start, cu_seqlens)     # (B, T, H)
        if last_only:
            # A long prompt's logits are large: compute only the last position's.
            hidden = hidden[:, -1:]                                          # (B, 1, H)
        return self.lm_head(hidden)

    # ---- generation: prefill the prompt, then one decode step per new token (on CUDA, by
    # default, the step is captured once as a CUDA graph and replayed)

    def prefill(self, input_ids, pixel_values=None, image_sizes=None, cache=None):
        """The whole prompt in one pass, images included, writing the cache from position 0: the
        logits (B, vocab) of its last position."""
        return self(input_ids, pixel_values, image_sizes, cache=cache, last_only=True)[:, -1]

    def decode_step(self, ids, position, cache, start):
        """The logits (B, vocab) after one new token per row: ids (B, 1) at position (1,), a tensor.

        Only the decoder runs: a new token is text, embedded directly (embed() would sync with the
        host to count image slots). start is where the cache writes: the int position (dynamic
        shapes), or the tensor itself (the fixed-shape step, which a CUDA graph can capture).
        """
        x = self.decoder.embed_tokens(ids)                          # (B, 1, H)
        positions = position.expand(ids.shape[0], 1)                # (B, 1)
        hidden = self.decoder(x, positions, cache, start)           # (B, 1, H)
        return self.lm_head(hidden)[:, -1]                          # (B, vocab)

    @staticmethod
    def capture_decode_step(decode, input_ids):
        """decode(ids, position, start) captured as a CUDA graph: one launch per token, not ~1500.

        make_graphed_callables runs decode once on a side stream (the warm-up), then captures it;
        both write the cache at position 0, so this runs before the prefill, which overwrites what
        they wrote. A call of the graphed step copies its arguments into the captured inputs and
        replays the graph; its output is the graph's own tensor, which the next call rewrites.
        """
        position = input_ids.new_zeros(1)                          # (1,)
        ids = input_ids.new_zeros(input_ids.shape[0], 1)           # (B, 1)
        sample_args = (ids, position, position)
        return torch.cuda.make_graphed_callables(decode, sample_args, num_warmup_iters=1)

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, image_sizes=None, max_new_tokens=32,
                 temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                 stop_ids=(151645, 151643), use_cache=True, generator=None, on_token=None,
                 cuda_graph=None):
        """New token ids (B, n), n <= max_new_tokens. Greedy unless temperature > 0.

        A row that emits a stop id keeps repeating it until every row has stopped. use_cache=False
        recomputes the whole sequence at every step (slow; the oracle for the cache).
        on_token(ids (B,)) is called as tokens arrive. cuda_graph (default: on CUDA) uses the
        fixed-shape cached step: a CUDA graph there (1 launch, not ~1500).
        """
        # ---- check the request
        b, t = input_ids.shape
        total = t + max_new_tokens
        context = self.config.text.max_positions
        if total > context:
            raise ValueError(f"prompt ({t} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"the context of {context} positions; shorten the prompt or ask "
                             "for fewer tokens")
        if cuda_graph and not use_cache:
            raise ValueError("cuda_graph=True needs use_cache=True: "
                             "the graph replays the cached one-token step")
        # ---- the cache and the decode step: dynamic shapes, or fixed ones (a CUDA graph on CUDA)
        c = self.config.text
        weight = self.decoder.embed_tokens.weight
        cache = None
        if use_cache:
            check_kv_cache_fits(c, b, t, max_new_tokens, weight)
            cache = KVCache(c.layers, b, c.kv_heads, total, c.head_dim, weight.dtype, weight.device)

        def decode(ids, position, start):
            """decode_step with this call's cache: tensors in, tensors out, as a graph needs."""
            return self.decode_step(ids, position, cache, start)

        fixed = use_cache and (weight.is_cuda if cuda_graph is None else cuda_graph)
        if fixed and weight.is_cuda:
            decode = self.capture_decode_step(decode, input_ids)
        # ---- prefill
        stop = torch.tensor(list(stop_ids), dtype=torch.long, device=input_ids.device)
        finished = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        sequence = input_ids
        logits = self.prefill(input_ids, pixel_values, image_sizes, cache)     # (B, vocab)
        # ---- decode: pick a token, append it, then the logits that follow it
        for step in range(max_new_tokens):
            token = next_token(logits, sequence, temperature, top_k, top_p, repetition_penalty,
                               generator, self.config.image_token_id)        # (B,)
            token = torch.where(finished, sequence[:, -1], token)   # a stopped row repeats its stop
            sequence = torch.cat([sequence, token[:, None]], dim=1)         # (B, T + step + 1)
            if on_token is not None:
                on_token(token)
            finished |= torch.isin(token, stop)
            if finished.all() or step == max_new_tokens - 1:
                break
            if use_cache:
                # The new token's position, as a tensor; the fixed-shape step also takes it as
                # the cache's start.
                at = torch.full((1,), t + step, device=token.device)         # (1,)
                start = at if fixed else t + step
                logits = decode(token[:, None], at, start)                   # (B, vocab)
            else:
                logits = self(sequence, pixel_values, image_sizes)[:, -1]    # (B, vocab)
        return sequence[:, t:]


def next_token(logits, sequence, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
               generator=None, image_token_id=IMAGE_SLOT_ID):
    """Pick the next token from logits (B, vocab), in the order of the released generation config:
    repetition penalty, temperature, top-k, top-p, then sample (or argmax when temperature is 0)."""
    logits = logits.float()
    if repetition_penalty != 1.0:
        # Image slots are not text: send them to an extra column that is dropped.
        vocab = logits.shape[-1]
        ids = sequence.masked_fill(sequence == image_token_id, vocab)
        seen = torch.zeros(logits.shape[0], vocab + 1, dtype=torch.bool, device=logits.device)
        seen = seen.scatter(1, ids, True)[:, :vocab]                         # (B, vocab)
        penalised = torch.where(logits > 0,
                                logits / repetition_penalty,
                                logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # Drop the least likely tokens whose total probability stays within 1 - top_p; the top
        # token always stays.
        sorted_logits, order = logits.sort(dim=-1)                          # ascending
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False
        dropped = torch.zeros_like(drop).scatter(1, order, drop)            # (B, vocab) unsorted
        logits = logits.masked_fill(dropped, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


# ==== 9. Loading released checkpoints: both layouts, single or sharded safetensors, memory-mapped (§2)

# Checkpoint key prefix -> our module path. Checked in order; the last rule catches the original
# decoder keys.
KEY_PREFIXES = [
    ("model.vision_tower.vision_tower.", "vision."),                 # original (lmms-lab)
    ("vision_tower.", "vision."),                                    # hub HF layout, transformers 5
    ("model.vision_tower.", "vision."),                              # newer transformers
    ("model.mm_projector.0.", "projector.linear_1."),
    ("model.mm_projector.2.", "projector.linear_2."),
    ("multi_modal_projector.", "projector."),
    ("model.multi_modal_projector.", "projector."),
    ("model.image_newline", "image_newline"),
    ("language_model.model.", "decoder."),
    ("model.language_model.", "decoder."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
    ("model.", "decoder."),
]
# Our modules are flatter than the checkpoints: SigLIP's vision_model. / embeddings. / encoder.
# and Qwen2's mlp. nesting.
KEY_INFIXES = [("vision.vision_model.", "vision."), ("vision.embeddings.", "vision."),
               ("vision.encoder.", "vision."), (".mlp.", ".")]


def our_key(key):
    """A checkpoint key of either layout -> the name of our parameter."""
    for prefix, ours in KEY_PREFIXES:
        if key.startswith(prefix):
            key = ours + key[len(prefix):]
            break
    for infix, ours in KEY_INFIXES:
        key = key.replace(infix, ours, 1)
    return key


def open_safetensors(file):
    """{name: tensor} of one .safetensors file, read by the safetensors library. Each tensor views
    a private memory map of the file: nothing is read until a tensor is used, and writing to a
    tensor never changes the file.

    The format: 8 bytes, the header's length as a little-endian unsigned integer; the header, JSON
    {name: {"dtype": "BF16", "shape": [rows, cols], "data_offsets": [begin, end]}, ...} with an
    optional "__metadata__": {str: str}; then the raw data, little-endian and row-major, where
    tensor `name` holds bytes begin..end counted from the end of the header. The library refuses
    anything else: a header of the wrong type or depth, offsets that are negative, overlap, leave
    gaps or run past the end of the file.
    """
    def corrupt(why):
        """The error for this file, saying why."""
        return CheckpointError(f"{file} is truncated or corrupt ({why}); download it again")
    # A file too short for its own header: say so in the format's terms.
    size = os.path.getsize(file)
    if size < 8:
        raise corrupt(f"only {size} bytes")
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    if header_len > size - 8:
        raise corrupt(f"header of {header_len} bytes in a file of {size}")
    try:
        with safe_open(file, framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as e:
        why = str(e).removeprefix("Error while deserializing header: ")
        raise corrupt(f"unreadable header: {why}") from None
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        raise corrupt(f"{type(e).__name__}: {e}") from None


def is_inside(file, folder):
    """Whether the absolute path file lies in (or is) the absolute path folder."""
    return os.path.commonpath([file, folder]) == folder


def weight_file(path, name, index=None):
    """The weight file `name` of the checkpoint folder path (a shard listed in index, or the single
    model.safetensors), refused when it lies outside the folder: an absolute path, a path that
    climbs out with .., or a symbolic link to a file elsewhere. The one link allowed is the
    Hugging Face cache's, from snapshots/<commit>/<file> to the repository's blobs/ folder."""
    described = f"shard {name!r} listed in {index}" if index else name

    def refuse(why):
        """The error for this file, saying why; nothing of the file is read or shown."""
        return CheckpointError(f"{described} {why}; weight files must lie in the checkpoint "
                               f"folder {path}: fix {index or 'the link'} or download again")
    if "\0" in name:
        raise refuse("is not a file name")
    if os.path.isabs(name):
        raise refuse("is an absolute path, outside the folder")
    folder = os.path.abspath(path)
    file = os.path.normpath(os.path.join(folder, name))
    if not is_inside(file, folder):
        raise refuse("is outside the folder (it climbs out with ..)")
    # Where the file really is, every link followed, against where the folder really is.
    real_folder = os.path.realpath(folder)
    allowed = [real_folder]
    snapshots = os.path.dirname(real_folder)
    if os.path.basename(snapshots) == "snapshots":
        allowed.append(os.path.join(os.path.dirname(snapshots), "blobs"))
    real_file = os.path.realpath(file)
    if not any(is_inside(real_file, place) for place in allowed):
        raise refuse("is a symbolic link to a file outside the folder")
    return file


def read_index(index):
    """The weight_map of model.safetensors.index.json, {tensor name: shard file name}, checked."""
    try:
        with open(index, encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, ValueError, RecursionError) as e:   # ValueError: bad JSON or UTF-8
        raise CheckpointError(f"{index} is unreadable ({type(e).__name__}: {e}); "
                              "download it again") from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{index} must be a JSON object with a weight_map, "
                              f"not {shown(content)}; download it again")
    if "weight_map" not in content:
        raise CheckpointError(f"{index} has no weight_map; download it again")
    weight_map = content["weight_map"]
    is_map = isinstance(weight_map, dict)
    if not is_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names, "
                              f"not {shown(weight_map)}; download it again")
    return weight_map


def read_checkpoint_tensors(path):
    """All tensors of a checkpoint folder: model.safetensors, or the shards its index lists."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_index(index)
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            file = weight_file(path, shard, index)
            if not os.path.isfile(file):
                raise CheckpointError(f"shard {shard} listed in {index} is missing; download it")
            tensors.update(open_safetensors(file))
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise CheckpointError(f"{len(absent)} tensors listed in {index} are in no shard: "
                                  f"{absent[:10]}")
        return tensors
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise CheckpointError(f"no model.safetensors(.index.json) in {path}; "
                              f"it holds {sorted(os.listdir(path))}")
    return open_safetensors(weight_file(path, "model.safetensors"))


# ---- config.json of either layout -> ModelConfig (§2). Every field is checked by type and range
# before anything is built from it, each refusal one line naming the field, its value and the fix.

# Our field name -> the key in config.json, for the vision block and the text block.
VISION_CONFIG_KEYS = (
    ("hidden", "hidden_size"), ("intermediate", "intermediate_size"),
    ("heads", "num_attention_heads"), ("layers", "num_hidden_layers"),
    ("image_size", "image_size"), ("patch_size", "patch_size"),
    ("eps", "layer_norm_eps"), ("act", "hidden_act"),
)
TEXT_CONFIG_KEYS = (
    ("hidden", "hidden_size"), ("intermediate", "intermediate_size"),
    ("heads", "num_attention_heads"), ("layers", "num_hidden_layers"),
    ("vocab", "vocab_size"), ("eps", "rms_norm_eps"), ("max_positions", "max_position_embeddings"),
)


def _pick(d, key, default):
    """d[key], or default when the key is missing or null."""
    return d[key] if d.get(key) is not None else default


def shown(value):
    """repr(value), cut to 60 characters, so that a message stays one line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def config_error(field, value, rule):
    """The CheckpointError for one field of config.json: its name, its value, what it must be."""
    return CheckpointError(f"config.json: {field} = {shown(value)}, but it must be {rule}; "
                           "correct the file (or download it again)")


def check_size(field, value):
    """A size or a count: a positive int below 2**31 (not a bool, a float or a string)."""
    if type(value) is not int or not 0 < value < 2 ** 31:
        raise config_error(field, value, "a positive whole number such as 1024")
    return value


def check_positive_number(field, value):
    """An eps or a theta: a positive, finite int or float (not a bool, NaN or a string)."""
    if type(value) not in (int, float) or not 0 < value < math.inf:
        raise config_error(field, value, "a positive finite number such as 1e-06")
    return value


def check_like_default(field, value, default):
    """A field checked as its default's type says: a float is a positive number, an int a size."""
    if isinstance(default, float):
        return check_positive_number(field, value)
    if isinstance(default, int):
        return check_size(field, value)
    return value   # a string (hidden_act): check_activation names the ones we implement


def check_flag(field, value, default):
    """A true/false field: a JSON boolean, or missing / null for the default."""
    if value is None:
        return default
    if not isinstance(value, bool):
        raise config_error(field, value, "true or false")
    return value


def check_block(field, block):
    """A nested block of config.json (text_config, vision_config, ...): an object, or missing."""
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise config_error(field, block, "an object {...}")
    return block


def check_pinpoints(pinpoints, tile):
    """image_grid_pinpoints: a non-empty list of [width, height] canvases of at least one tile."""
    rule = f"a non-empty list of [width, height] pairs of whole numbers >= {tile} (the tile)"
    if not isinstance(pinpoints, list) or not pinpoints:
        raise config_error("image_grid_pinpoints", pinpoints, rule)
    for pair in pinpoints:
        is_pair = isinstance(pair, list) and len(pair) == 2
        if not is_pair or not all(type(side) is int and tile <= side < 2 ** 31 for side in pair):
            raise config_error("image_grid_pinpoints", pinpoints, rule)
    return pinpoints


def original_layout_blocks(cfg):
    """The original layout (lmms-lab, llava_qwen): the Qwen2 fields sit at the top of config.json
    and the tower is named only by id. Returns (text block, vision block, feature_layer)."""
    projector = cfg.get("mm_projector_type", "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        raise CheckpointError(f"mm_projector_type {shown(projector)} is not supported; "
                              "this release uses 'mlp2x_gelu'")
    # The release writes mm_vision_select_layer = -2, but its SigLIP tower ignores it and returns
    # the last stored layer: the features are hidden_states[-1] (§1).
    feature_layer = -1
    # Small test checkpoints carry a `vision_config` block.
    return cfg, check_block("vision_config", cfg.get("vision_config")), feature_layer


def hf_layout_blocks(cfg):
    """The HF layout (llava-hf, llava): nested text_config / vision_config blocks. Returns
    (text block, vision block, feature_layer); refuses the settings this model does not follow."""
    text_block = check_block("text_config", cfg.get("text_config"))
    vision_block = check_block("vision_config", cfg.get("vision_config"))
    feature_layer = _pick(cfg, "vision_feature_layer", -2)
    if type(feature_layer) is not int:
        raise config_error("vision_feature_layer", feature_layer,
                           "one layer number such as -1 (only a single integer layer is supported)")
    strategy = _pick(cfg, "vision_feature_select_strategy", "default")
    if strategy != "full":
        raise CheckpointError(f"vision_feature_select_strategy {shown(strategy)}: "
                              "SigLIP has no CLS token to drop; this model needs 'full'")
    act = _pick(cfg, "projector_hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"projector_hidden_act {shown(act)} is not supported; "
                              "the release uses exact 'gelu'")
    tower = vision_block.get("model_type", "siglip_vision_model")
    if tower != "siglip_vision_model":
        raise CheckpointError(f"vision tower {shown(tower)} is not supported; only SigLIP is")
    return text_block, vision_block, feature_layer


def vision_config_from_block(vision_block, layout, feature_layer):
    """VisionConfig from a vision block. A missing field means so400m in the original layout (the
    tower is named by id), SigLIP's own default in HF's."""
    if layout == "original":
        defaults = VisionConfig()
    else:
        defaults = VisionConfig(hidden=768, intermediate=3072, heads=12, layers=12,
                                image_size=224, patch_size=16)
    values = {}
    for ours, theirs in VISION_CONFIG_KEYS:
        default = getattr(defaults, ours)
        value = _pick(vision_block, theirs, default)
        values[ours] = check_like_default(f"vision_config.{theirs}", value, default)
    return VisionConfig(**values, feature_layer=feature_layer)


def text_config_from_block(text_block, cfg, prefix):
    """TextConfig from a text block; a missing field takes Qwen2's default (§2). prefix: where the
    block sits in config.json ("text_config." or "" for the top level), to name a bad field."""
    # transformers 5 writes rope_parameters {rope_type, rope_theta} where older files have
    # rope_theta / rope_scaling.
    rope = check_block(prefix + "rope_parameters", text_block.get("rope_parameters"))
    if text_block.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"rope scaling {shown(text_block.get('rope_scaling') or rope)} "
                              "is not supported (the releases use plain rotary embeddings)")
    values = {}
    for ours, theirs in TEXT_CONFIG_KEYS:
        default = getattr(TextConfig, ours)
        value = _pick(text_block, theirs, default)
        values[ours] = check_like_default(prefix + theirs, value, default)
    text = TextConfig(**values)
    kv_heads = _pick(text_block, "num_key_value_heads", text.heads)   # none: plain multi-head
    text.kv_heads = check_size(prefix + "num_key_value_heads", kv_heads)
    if text.heads > text.hidden:
        raise config_error(prefix + "num_attention_heads", text.heads,
                           f"at most hidden_size ({text.hidden})")
    head_dim = _pick(text_block, "head_dim", text.hidden // text.heads)
    text.head_dim = check_size(prefix + "head_dim", head_dim)
    theta = _pick(text_block, "rope_theta", TextConfig.rope_theta)
    theta_field = prefix + ("rope_parameters.rope_theta" if "rope_theta" in rope else "rope_theta")
    text.rope_theta = float(check_positive_number(theta_field, _pick(rope, "rope_theta", theta)))
    # The tie flag may sit in the text block or at the top of config.json (§2).
    if "tie_word_embeddings" in text_block:
        tie_field = prefix + "tie_word_embeddings"
        tied = text_block["tie_word_embeddings"]
    else:
        tie_field = "tie_word_embeddings"
        tied = cfg.get("tie_word_embeddings")
    text.tie_embeddings = check_flag(tie_field, tied, False)
    if text.heads % text.kv_heads:
        raise CheckpointError(f"num_attention_heads {text.heads} is not a multiple of "
                              f"kv heads {text.kv_heads}")
    return text


def check_activation(name, act, known):
    """Refuse a hidden_act that this file does not implement."""
    if act not in known:
        raise CheckpointError(f"{name} hidden_act {shown(act)} is not supported "
                              f"(expected one of {known})")


def config_from_dict(cfg):
    """Read config.json of either release layout, handling the traps of §2. Every field is checked
    by type and range here, before anything is built from it."""
    # ---- which layout: where the text and vision fields are
    if not isinstance(cfg, dict):
        raise CheckpointError(f"config.json must be a JSON object {{...}}, not {shown(cfg)}; "
                              "download the checkpoint's config.json again")
    model_type = cfg.get("model_type")
    if model_type == "llava_qwen":
        layout = "original"
        text_block, vision_block, feature_layer = original_layout_blocks(cfg)
    elif model_type == "llava":
        layout = "hf"
        text_block, vision_block, feature_layer = hf_layout_blocks(cfg)
    else:
        raise CheckpointError(f"unknown model_type {shown(model_type)} in config.json: expected "
                              "'llava_qwen' (lmms-lab original layout) or 'llava' "
                              "(llava-hf layout)")
    # ---- the decoder and the vision tower
    text = text_config_from_block(text_block, cfg, "text_config." if layout == "hf" else "")
    vision = vision_config_from_block(vision_block, layout, feature_layer)
    check_activation("text", text_block.get("hidden_act", "silu"), ("silu",))
    check_activation("vision", vision.act, ("gelu_pytorch_tanh", "gelu"))
    # ---- the whole model
    token_field = "image_token_index" if "image_token_index" in cfg else "image_token_id"
    image_token_id = _pick(cfg, token_field, IMAGE_SLOT_ID)
    if type(image_token_id) is not int or not 0 <= image_token_id < 2 ** 31:
        raise config_error(token_field, image_token_id, "a token id (a whole number >= 0)")
    pinpoints = _pick(cfg, "image_grid_pinpoints", list(GRID_PINPOINTS))
    return ModelConfig(
        vision=vision, text=text, layout=layout, has_image_newline=layout == "original",
        image_token_id=image_token_id,
        projector_bias=check_flag("multimodal_projector_bias",
                                  cfg.get("multimodal_projector_bias"), True),
        grid_pinpoints=check_pinpoints(pinpoints, vision.image_size))


def read_config(path):
    """The ModelConfig of a checkpoint folder's config.json."""
    file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    if not os.path.isfile(file):
        raise CheckpointError(f"no config.json in {path}: "
                              "a checkpoint folder holds config.json and safetensors files")
    try:
        with open(file, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError, RecursionError) as e:   # ValueError: bad JSON or UTF-8
        raise CheckpointError(f"cannot read {file}: {type(e).__name__}: {e}") from None
    return config_from_dict(cfg)


def stored_layer_count(stored, prefix):
    """How many layers the checkpoint holds under prefix ("decoder.layers.", "vision.layers.")."""
    return len({k[len(prefix):].split(".")[0] for k in stored if k.startswith(prefix)})


def check_layer_count(path, config, stored):
    """Refuse a config.json whose decoder layer count differs from the checkpoint's, before a model
    of that many layers is built (100000 layers would take minutes and gigabytes to build)."""
    held = stored_layer_count(stored, "decoder.layers.")
    if config.text.layers != held:
        field = "text_config.num_hidden_layers" if config.layout == "hf" else "num_hidden_layers"
        raise CheckpointError(f"{field} = {config.text.layers} in {path}/config.json, but the "
                              f"checkpoint holds {held} decoder layers; correct config.json "
                              "(or download the checkpoint again)")


# The dtypes a checkpoint's weights may be stored in; anything else is refused, not cast.
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_weight_dtypes(path, stored):
    """Refuse weights stored as integers, booleans or exotic floats (a file that is not a model)."""
    odd = sorted(k for k, t in stored.items() if t.dtype not in WEIGHT_DTYPES)
    if odd:
        dtypes = sorted({str(stored[k].dtype) for k in odd})
        raise CheckpointError(f"{path}: {len(odd)} tensors are stored as {', '.join(dtypes)} "
                              f"({', '.join(odd[:3])}, ...); a checkpoint holds float32, bfloat16, "
                              "float16 or float64 weights")


def check_checkpoint_keys(path, config, stored, expected):
    """Raise one CheckpointError that lists every missing, unexpected and wrongly shaped tensor
    (stored: the checkpoint's, expected: the model's, both by our key), and says what to do about
    an lm_head that is tied or untied against config.json."""
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    wrong_shape = []
    for k in sorted(set(stored) & set(expected)):
        if stored[k].shape != expected[k].shape:
            wrong_shape.append(f"{k}: checkpoint {tuple(stored[k].shape)}, "
                               f"config wants {tuple(expected[k].shape)}")
    if not (missing or unexpected or wrong_shape):
        return
    lines = [f"checkpoint {path} does not match its config.json:"]
    groups = [("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)]
    for title, items in groups:
        if items:
            listed = ", ".join(items[:20])
            if len(items) > 20:
                listed += " ..."
            lines.append(f"  {len(items)} {title}: {listed}")
    if "lm_head.weight" in unexpected and config.text.tie_embeddings:
        lines.append("  config.json says tie_word_embeddings=true, "
                     "yet the checkpoint has an lm_head")
    if "lm_head.weight" in missing:
        lines.append("  no lm_head tensor: "
                     "if the head is tied to the embedding, set tie_word_embeddings=true")
    raise CheckpointError("\n".join(lines))


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")   # org/name
# What a checkpoint needs from a hub repository, and nothing else (no .bin weights, no README).
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "generation_config.json"]


def checkpoint_folder(path):
    """The local folder of a checkpoint given as a folder or as a hub id (org/name). A folder that
    exists always wins; an id is looked up in the Hugging Face cache, and downloaded into it when
    missing (huggingface_hub's snapshot_download: HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE apply)."""
    path = os.fspath(path)
    if os.path.exists(path) or not HUB_ID.fullmatch(path):
        return path
    return download_checkpoint(path)


def download_checkpoint(repo_id):
    """snapshot_download of the files in HUB_FILES; each way it can fail is one CheckpointError."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError)
    endpoint = constants.ENDPOINT
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_FILES)
    except GatedRepoError:   # before RepositoryNotFoundError, its parent
        raise CheckpointError(f"{repo_id} on {endpoint} is gated: accept its terms on its page, "
                              "then set HF_TOKEN to a token of that account") from None
    except RepositoryNotFoundError:   # the hub answers so for a private repo too
        raise CheckpointError(f"{repo_id} is neither a local folder nor a model on {endpoint}; "
                              "check the path or the id (a private model also needs HF_TOKEN)"
                              ) from None
    except LocalEntryNotFoundError:   # offline or unreachable, and not (all) in the cache
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{endpoint} is unreachable"
        raise CheckpointError(
            f"{repo_id} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}: "
            "download it with network access (HF_ENDPOINT names a mirror, HF_HUB_OFFLINE must be "
            "unset), or give the path of a local checkpoint folder instead") from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"{endpoint} answered {e.response.status_code} for {repo_id}; "
                              "try again later") from None
    except Exception as e:   # a connection dropped mid-file, a full disk, ...
        # (the HTTP library under huggingface_hub, and so its error classes, differ by version)
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"downloading {repo_id} from {endpoint} stopped "
                              f"({type(e).__name__}: {why}); run again to resume") from None


def load(path, device=None, dtype=None, attn=None):
    """Build the model for a checkpoint folder (or hub id) in either release layout and load its
    weights.

    device: default cpu. dtype: default the checkpoint's own (bf16 for the releases); other dtypes
    are cast tensor by tensor, straight from the file. attn: "plain", "sdpa" or "triton" (default:
    triton on CUDA, sdpa elsewhere). On the CPU with the stored dtype the parameters stay views of
    the memory-mapped file: one copy, paged in lazily.
    """
    # ---- the files: config.json and every tensor, under our key
    path = checkpoint_folder(path)
    config = read_config(path)
    stored = {our_key(k): t for k, t in read_checkpoint_tensors(path).items()}
    # ---- what config.json does not say, from the tensors, and what it must agree with
    # The releases store 26 SigLIP layers of so400m's 27; the model has exactly the layers the
    # checkpoint holds.
    config.vision.layers = stored_layer_count(stored, "vision.layers.")
    check_layer_count(path, config, stored)
    check_weight_dtypes(path, stored)
    # An HF-layout checkpoint of a model trained with multi-patch (train.py) stores
    # `image_newline` as an extra key.
    config.has_image_newline = config.has_image_newline or "image_newline" in stored
    # ---- the model, with no memory yet, checked key by key against the checkpoint
    try:
        with torch.device("meta"):
            model = LlavaInterleave(config)
    except RuntimeError as e:   # sizes whose product overflows: tensors too large to exist
        raise CheckpointError(f"{path}/config.json describes tensors too large to exist ({e}); "
                              "correct its sizes") from None
    expected = dict(model.state_dict())
    if config.text.tie_embeddings:
        expected.pop("lm_head.weight")
    check_checkpoint_keys(path, config, stored, expected)
    # ---- the weights
    device = torch.device(device or "cpu")
    dtype = dtype or stored["decoder.embed_tokens.weight"].dtype
    # strict=False only because a tied lm_head has no tensor; every key was checked above.
    weights = {k: t.to(device=device, dtype=dtype) for k, t in stored.items()}
    model.load_state_dict(weights, assign=True, strict=False)
    if config.text.tie_embeddings:   # assign=True replaced the shared parameter: tie again
        model.lm_head.weight = model.decoder.embed_tokens.weight
    default_attn = "triton" if device.type == "cuda" else "sdpa"
    return model.eval().set_attention(attn or default_attn)
