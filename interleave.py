"""LLaVA-NeXT-Interleave (arXiv 2407.07895) from scratch, in one file.

The model reads a stream of text tokens in which some positions are image slots. Pixels go through
a SigLIP vision transformer, a two-layer MLP projects each patch feature into the decoder's width,
the projected vectors replace the slots, and a Qwen2 decoder predicts the next token. Multi-image,
video frames, 3D views and the tiles of one large image are all the same thing to the model: more
slots in the stream. The file reads in that order:

    config -> images (files, multi-patch tiles, video frames)
           -> text (template, conversations, training samples, packing)
           -> attention -> vision transformer -> projector -> splice -> decoder
           -> generation -> checkpoint loader

Facts about the released checkpoints (shapes, key names, traps) are in docs/MODEL.md; the comments
cite its sections (§).
"""
import json
import math
import mmap
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps
from tokenizers import Tokenizer

# ==== 1. Configuration: small dataclasses, filled from either release's config.json

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


def original_layout_blocks(cfg):
    """The original layout (lmms-lab, llava_qwen): the Qwen2 fields sit at the top of config.json
    and the tower is named only by id. Returns (text block, vision block, feature_layer)."""
    projector = cfg.get("mm_projector_type", "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        raise CheckpointError(f"mm_projector_type {projector!r} is not supported; "
                              "this release uses 'mlp2x_gelu'")
    # The release writes mm_vision_select_layer = -2, but its SigLIP tower ignores it and returns
    # the last stored layer: the features are hidden_states[-1] (§1).
    feature_layer = -1
    # Small test checkpoints carry a `vision_config` block.
    return cfg, cfg.get("vision_config") or {}, feature_layer


def hf_layout_blocks(cfg):
    """The HF layout (llava-hf, llava): nested text_config / vision_config blocks. Returns
    (text block, vision block, feature_layer); refuses the settings this model does not follow."""
    text_block = cfg.get("text_config") or {}
    vision_block = cfg.get("vision_config") or {}
    feature_layer = _pick(cfg, "vision_feature_layer", -2)
    if not isinstance(feature_layer, int):
        raise CheckpointError(f"vision_feature_layer {feature_layer!r}: "
                              "only a single integer layer is supported")
    strategy = _pick(cfg, "vision_feature_select_strategy", "default")
    if strategy != "full":
        raise CheckpointError(f"vision_feature_select_strategy {strategy!r}: "
                              "SigLIP has no CLS token to drop; this model needs 'full'")
    act = _pick(cfg, "projector_hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"projector_hidden_act {act!r} is not supported; "
                              "the release uses exact 'gelu'")
    tower = vision_block.get("model_type", "siglip_vision_model")
    if tower != "siglip_vision_model":
        raise CheckpointError(f"vision tower {tower!r} is not supported; only SigLIP is")
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
        values[ours] = _pick(vision_block, theirs, getattr(defaults, ours))
    return VisionConfig(**values, feature_layer=feature_layer)


def text_config_from_block(text_block, cfg):
    """TextConfig from a text block; a missing field takes Qwen2's default (§2)."""
    # transformers 5 writes rope_parameters {rope_type, rope_theta} where older files have
    # rope_theta / rope_scaling.
    rope = text_block.get("rope_parameters") or {}
    if text_block.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"rope scaling {text_block.get('rope_scaling') or rope!r} "
                              "is not supported (the releases use plain rotary embeddings)")
    values = {}
    for ours, theirs in TEXT_CONFIG_KEYS:
        values[ours] = _pick(text_block, theirs, getattr(TextConfig, ours))
    text = TextConfig(**values)
    text.kv_heads = _pick(text_block, "num_key_value_heads", text.heads)   # none: plain multi-head
    text.head_dim = _pick(text_block, "head_dim", text.hidden // text.heads)
    theta = _pick(text_block, "rope_theta", TextConfig.rope_theta)
    text.rope_theta = float(_pick(rope, "rope_theta", theta))
    # The tie flag may sit in the text block or at the top of config.json (§2).
    tied = text_block.get("tie_word_embeddings", cfg.get("tie_word_embeddings"))
    text.tie_embeddings = bool(tied)
    if text.heads % text.kv_heads:
        raise CheckpointError(f"num_attention_heads {text.heads} is not a multiple of "
                              f"kv heads {text.kv_heads}")
    return text


def check_activation(name, act, known):
    """Refuse a hidden_act that this file does not implement."""
    if act not in known:
        raise CheckpointError(f"{name} hidden_act {act!r} is not supported "
                              f"(expected one of {known})")


def config_from_dict(cfg):
    """Read config.json of either release layout, handling the traps of §2."""
    # ---- which layout: where the text and vision fields are
    model_type = cfg.get("model_type")
    if model_type == "llava_qwen":
        layout = "original"
        text_block, vision_block, feature_layer = original_layout_blocks(cfg)
    elif model_type == "llava":
        layout = "hf"
        text_block, vision_block, feature_layer = hf_layout_blocks(cfg)
    else:
        raise CheckpointError(f"unknown model_type {model_type!r} in config.json: expected "
                              "'llava_qwen' (lmms-lab original layout) or 'llava' "
                              "(llava-hf layout)")
    # ---- the decoder and the vision tower
    text = text_config_from_block(text_block, cfg)
    vision = vision_config_from_block(vision_block, layout, feature_layer)
    check_activation("text", text_block.get("hidden_act", "silu"), ("silu",))
    check_activation("vision", vision.act, ("gelu_pytorch_tanh", "gelu"))
    # ---- the whole model
    image_token_id = _pick(cfg, "image_token_index", _pick(cfg, "image_token_id", IMAGE_SLOT_ID))
    return ModelConfig(
        vision=vision, text=text, layout=layout, has_image_newline=layout == "original",
        image_token_id=image_token_id,
        projector_bias=cfg.get("multimodal_projector_bias", True),
        grid_pinpoints=_pick(cfg, "image_grid_pinpoints", list(GRID_PINPOINTS)))


# ==== 2. Images (§4): opening any file, plain views, multi-patch tiles, video frames

class InputError(ValueError):
    """Bad input (an image, a video, a prompt); the message says what is wrong and how to fix it."""


MULTIPATCH_NEEDS_NEWLINE = ("multi-patch (anyres) needs the `image_newline` vector, which only "
                            "the original lmms-lab release carries (the Hugging Face conversion "
                            "dropped it): load an original checkpoint, or pass the image as a "
                            "plain image")


def read_image_file(source):
    """Image.open + load, with every way a file can fail turned into one clear InputError."""
    try:
        image = Image.open(source)
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
    """A path or PIL image, in any mode -> RGB PIL image, upright (EXIF orientation applied)."""
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


def sample_frame_indices(total, num_frames):
    """Uniform sampling, as the official demo: np.linspace(0, total - 1, n, dtype=int). With no
    more frames than asked for, all of them (the demo divides by zero there)."""
    if total <= num_frames:
        return list(range(total))
    return np.linspace(0, total - 1, num_frames, dtype=int).tolist()


def natural_sort_key(name):
    """Sort key for natural name order: digit runs compare as numbers (frame2 before frame10)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def read_video_frames(source, num_frames=16):
    """Frames sampled uniformly from a folder of frames (natural name order), an animated GIF, WebP
    or PNG, or a list of images or paths. Each frame is one <image> of 729 slots; none is pooled."""
    if isinstance(source, (list, tuple)):
        frames = list(source)
    elif os.path.isdir(source):
        names = sorted(os.listdir(source), key=natural_sort_key)
        frames = [os.path.join(source, name) for name in names
                  if name.lower().endswith(FRAME_EXTENSIONS)]
    else:
        # An animated image file: seek to each sampled frame.
        video = read_image_file(source)
        frames = []
        for index in sample_frame_indices(getattr(video, "n_frames", 1), num_frames):
            video.seek(index)
            frames.append(video.convert("RGB"))
        return frames
    if not frames:
        raise InputError(f"no video frames in {source}: "
                         f"expected image files ({', '.join(FRAME_EXTENSIONS)})")
    return [open_image(frames[i]) for i in sample_frame_indices(len(frames), num_frames)]


# ==== 3. Text (§3, §5): tokenizer, ChatML template, conversations -> model inputs, training samples, packing

IGNORE = -100   # the label of every position that carries no loss


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
    turn with markers needs exactly one per image. is_reply marks what the training loss sees: an
    assistant reply and its <|im_end|>.
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


def build_inputs(turns, tokenizer, config, system=SYSTEM_PROMPT, anyres=False,
                 add_generation_prompt=None):
    """A conversation (see chat_segments; images as PIL images or paths) -> Sample. Multi-image,
    video frames and 3D views are all just several images; anyres cuts a conversation's single
    image into tiles (§4)."""
    segments = chat_segments(turns, system, add_generation_prompt)
    # The images of every turn, in order: their pixels and the slots each takes.
    images = []
    for _, _, *rest in turns:
        if rest:
            images.extend(rest[0])
    if anyres and len(images) != 1:
        raise InputError(f"multi-patch (anyres) is for a single image; "
                         f"this conversation has {len(images)}")
    images = [open_image(image) for image in images]
    pixels = [preprocess(image, config, anyres) for image in images]
    sizes = [image.size if anyres else None for image in images]
    slots = [image_slots(config, size) for size in sizes]
    # The token ids, segment by segment; a label only on the text of a reply.
    ids = []
    labels = []
    for text, is_reply in segments:
        n_images = text.count(IMAGE_MARKER)
        piece = encode_prompt(tokenizer, text, config.image_token_id, slots[:n_images])
        slots = slots[n_images:]
        ids += piece
        labels += [t if is_reply and t != config.image_token_id else IGNORE for t in piece]
    pixel_values = torch.cat(pixels) if pixels else None
    return Sample(torch.tensor(ids), torch.tensor(labels), pixel_values, sizes)


def record_to_sample(record, image_folder, tokenizer, config, max_len=None, num_frames=16,
                     anyres=False):
    """An M4-Instruct / LLaVA record (§5) -> Sample, truncated to max_len tokens. Raises
    InputError for a record that cannot be used (the caller skips and counts it)."""
    # ---- the turns, in our role names
    roles = {"human": "user", "gpt": "assistant"}
    try:
        turns = [(roles[turn["from"]], turn["value"]) for turn in record["conversations"]]
    except (KeyError, TypeError) as e:
        raise InputError(f"record {record.get('id')!r} is malformed: {e!r}") from None
    markers = [text.count(IMAGE_MARKER) for _, text in turns]
    # ---- the images: a video's sampled frames, or the image files
    if "video" in record:
        # One <image> per frame; a short video has fewer, so its frames go in front instead.
        video = os.path.join(image_folder, record["video"])
        images = read_video_frames(video, sum(markers) or num_frames)
        turns = [(role, text.replace(IMAGE_MARKER, "").lstrip("\n")) for role, text in turns]
        markers = [0] * len(turns)
    else:
        images = record.get("image") or []
        if isinstance(images, str):
            images = [images]
        images = [os.path.join(image_folder, path) for path in images]
    if sum(markers) not in (0, len(images)):
        raise InputError(f"record {record.get('id')!r} has {sum(markers)} {IMAGE_MARKER} "
                         f"markers, {len(images)} images")
    # ---- each turn with its own images
    if not sum(markers):
        # No markers at all: every image goes in front of the first turn.
        markers[0] = len(images)
    starts = np.cumsum([0] + markers).tolist()
    turns = [(role, text, images[starts[i]:starts[i + 1]]) for i, (role, text) in enumerate(turns)]
    sample = build_inputs(turns, tokenizer, config, anyres=anyres and len(images) == 1,
                          add_generation_prompt=False)
    return truncate(sample, max_len, config) if max_len else sample


def truncate(sample, max_len, config):
    """Cut a sample to max_len tokens in its text only: a cut inside an image's slots moves back to
    before that image, and the images past the cut go with it. A sample with no answer left raises
    InputError."""
    ids = sample.input_ids
    cut = min(max_len, len(ids))
    slot = (ids == config.image_token_id).tolist() + [False]
    while cut > 0 and slot[cut] and slot[cut - 1]:
        cut -= 1
    if not (sample.labels[:cut] != IGNORE).any():
        raise InputError(f"sample of {len(ids)} tokens has no answer left within max_len {max_len}")
    # The images whose slots lie before the cut, and their views.
    kept_slots = sum(slot[:cut])
    n_images = 0
    while kept_slots > 0:
        kept_slots -= image_slots(config, sample.image_sizes[n_images])
        n_images += 1
    n_views = sum(image_views(config, size) for size in sample.image_sizes[:n_images])
    pixel_values = sample.pixel_values[:n_views] if n_images else None
    return Sample(ids[:cut], sample.labels[:cut], pixel_values, sample.image_sizes[:n_images])


def pack_samples(samples, budget, verbose=True):
    """Pack samples into Samples of at most budget tokens, with position_ids and cu_seqlens (§5):
    first-fit, longest first, no padding. Prints the efficiency: real tokens / (packs x budget)."""
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
        packs.append(Sample(
            input_ids=torch.cat([sample.input_ids for sample in group]),
            labels=torch.cat([sample.labels for sample in group]),
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
        import kernels
        cu_q = cu_k = None   # one sequence
        if cu_seqlens is not None:
            cu_q = cu_k = cu_seqlens.to(torch.int32)
        elif b > 1:   # each batch row becomes one segment of the packed layout
            cu_q = torch.arange(0, (b + 1) * tq, tq, dtype=torch.int32, device=q.device)
            cu_k = torch.arange(0, (b + 1) * tk, tk, dtype=torch.int32, device=q.device)
        hkv = k.shape[1]
        packed_q = q.transpose(1, 2).reshape(b * tq, h, d)     # (B*Tq, H, D)
        packed_k = k.transpose(1, 2).reshape(b * tk, hkv, d)   # (B*Tk, Hkv, D)
        packed_v = v.transpose(1, 2).reshape(b * tk, hkv, d)   # (B*Tk, Hkv, D)
        out = kernels.attention(packed_q, packed_k, packed_v, causal=causal,
                                cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, scale=scale)   # (B*Tq, H, D)
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


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8}


def open_safetensors(file):
    """{name: tensor} viewing a memory map of one .safetensors file: nothing is read until a tensor
    is used.

    The format: 8-byte little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets}}, the data. Every entry is checked against the file size, so a truncated or
    corrupt file fails here, naming the file.
    """
    def corrupt(why):
        """The error for this file, saying why."""
        return CheckpointError(f"{file} is truncated or corrupt ({why}); download it again")
    # ---- the header, and a map of the whole file
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        if size < 8:
            raise corrupt(f"only {size} bytes")
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > size - 8:
            raise corrupt(f"header of {header_len} bytes in a file of {size}")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise corrupt(f"unreadable header: {e}") from None
        # ACCESS_COPY: a private mapping, so a parameter may be written in place without touching
        # the file.
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    # ---- one tensor per entry, a view of its bytes
    tensors = {}
    data_start = 8 + header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = info["shape"]
            begin, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"bad header entry for {name}: {info}") from None
        count = math.prod(shape)
        nbytes = count * torch.empty(0, dtype=dtype).element_size()
        if end - begin != nbytes or begin < 0 or data_start + end > size:
            raise corrupt(f"{name} needs bytes {begin}..{end} of the data, "
                          "which the file does not hold")
        if nbytes:
            flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=data_start + begin)
            tensors[name] = flat.view(shape)
        else:
            # A tensor with no elements has no bytes to view.
            tensors[name] = torch.empty(shape, dtype=dtype)
    return tensors


def read_checkpoint_tensors(path):
    """All tensors of a checkpoint folder: model.safetensors, or the shards its index lists."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{index} is unreadable ({e}); download it again") from None
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            file = os.path.join(path, shard)
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
    return open_safetensors(single)


def read_config(path):
    """The ModelConfig of a checkpoint folder's config.json."""
    file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    if not os.path.isfile(file):
        raise CheckpointError(f"no config.json in {path}: "
                              "a checkpoint folder holds config.json and safetensors files")
    try:
        with open(file) as f:
            return config_from_dict(json.load(f))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {file}: {e}") from None


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


def load(path, device=None, dtype=None, attn=None):
    """Build the model for a checkpoint folder (or hub id) in either release layout and load its
    weights.

    device: default cpu. dtype: default the checkpoint's own (bf16 for the releases); other dtypes
    are cast tensor by tensor, straight from the file. attn: "plain", "sdpa" or "triton" (default:
    triton on CUDA, sdpa elsewhere). On the CPU with the stored dtype the parameters stay views of
    the memory-mapped file: one copy, paged in lazily.
    """
    # ---- the files: config.json and every tensor, under our key
    # A hub id (org/name) that is not a local folder: the local Hugging Face cache, else a download.
    import hub
    path = hub.local_path(path)
    config = read_config(path)
    stored = {our_key(k): t for k, t in read_checkpoint_tensors(path).items()}
    # ---- what config.json does not say, from the tensors
    # The releases store 26 SigLIP layers of so400m's 27; the model has exactly the layers the
    # checkpoint holds.
    layer_numbers = {k.split(".")[2] for k in stored if k.startswith("vision.layers.")}
    config.vision.layers = len(layer_numbers)
    # An HF-layout checkpoint of a model trained with multi-patch (train.py) stores
    # `image_newline` as an extra key.
    config.has_image_newline = config.has_image_newline or "image_newline" in stored
    # ---- the model, with no memory yet, checked key by key against the checkpoint
    with torch.device("meta"):
        model = LlavaInterleave(config)
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
