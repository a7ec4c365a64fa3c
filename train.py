"""Train LLaVA-NeXT-Interleave on M4-Instruct-format data: a tiny model from scratch, or fine-tune a checkpoint.

    python train.py --init tiny --synthetic 4000 --pretrain-tower 2500 --out out/tiny    # as the embedded model
    python train.py --init PATH --data m4.json --image-folder IMAGES --val val.json --out out/ft   # fine-tune
    torchrun --nproc_per_node 8 train.py ...      # the same run on 8 GPUs (DDP); --batch stays the global batch

Checkpoints: llava-hf layout, hub key names (SPEC §2), plus a top-level tensor `image_newline` (multi-patch needs it;
that layout has none): interleave.load reads it, transformers' LlavaForConditionalGeneration ignores it (same logits).
"""
import argparse, contextlib, functools, json, math, os, pathlib, pickle, re, shutil, sys, time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.checkpoint import checkpoint

import interleave, pretrain_tower
from data import make_m4
from interleave import IGNORE

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
PEAK_TFLOPS = {"H100": 989, "H200": 989, "B200": 2250, "A100": 312, "L40S": 362, "L4": 121, "A10": 125}   # bf16 dense
PRESETS = {   # fields of interleave's VisionConfig (its defaults: SigLIP so400m) and TextConfig; vocab: the tokenizer's
    "tiny": (dict(hidden=128, intermediate=512, heads=4, layers=2, image_size=64, patch_size=16),
             dict(hidden=160, intermediate=480, heads=5, kv_heads=5, head_dim=32, layers=4, rope_theta=1e4)),
    "0.5b-random": ({}, dict(hidden=1024, intermediate=2816, heads=16, kv_heads=16, head_dim=64, layers=24,
                             vocab=151936, rope_theta=1e6, max_positions=32768))}
_SHARED = dict(hidden="hidden_size", intermediate="intermediate_size", heads="num_attention_heads",
               layers="num_hidden_layers")
HF_NAMES = {   # interleave's config fields -> llava-hf config.json names, for the vision and the text config
    "vision": dict(_SHARED, eps="layer_norm_eps", image_size="image_size", patch_size="patch_size", act="hidden_act"),
    "text": dict(_SHARED, eps="rms_norm_eps", kv_heads="num_key_value_heads", head_dim="head_dim", vocab="vocab_size",
                 rope_theta="rope_theta", max_positions="max_position_embeddings",
                 tie_embeddings="tie_word_embeddings")}
HUB_PREFIXES = {"vision": "vision_tower.vision_model.", "decoder": "language_model.model.",
                "projector": "multi_modal_projector.", "lm_head": "language_model.lm_head."}
opt = lambda default, help: field(default=default, metadata={"help": help})   # noqa: E731  a Config field


@dataclass
class Config:
    init: str = opt("tiny", "'tiny' or '0.5b-random' (fresh weights) or a checkpoint folder to fine-tune")
    out: str = opt("out/run", "run folder: step-N/ checkpoints, latest (a link to the last), loss.png")
    data: str = opt("", "training records: M4-Instruct JSON (a list) or JSON Lines")
    image_folder: str = opt("", "where the records' image and video paths start (default: the data file's folder)")
    val: str = opt("", "held-out records: loss and exact-match accuracy per metadata.task")
    synthetic: int = opt(0, "instead of --data: draw this many records per task (data/make_m4.py) into OUT/data")
    steps: int = opt(2000, "optimizer steps")
    batch: int = opt(32, "records per step, over all processes")
    budget: int = opt(1024, "tokens per packed sequence; a longer sample is truncated to it")
    lr: float = opt(2e-3, "peak learning rate of AdamW (weight decay 0.05 on matrices, gradient norm clipped at 1)")
    warmup: int = opt(100, "steps of linear warmup; then a cosine down to a tenth of --lr")
    pretrain_tower: int = opt(0, "--init tiny: first train the tower alone for this many steps (pretrain_tower.py)")
    train_vision: bool = opt(False, "fine-tuning: train the vision tower too (from scratch it always is)")
    grad_ckpt: bool = opt(False, "activation checkpointing: recompute each block in the backward pass")
    bf16: bool = opt(None, "bf16 autocast (default: on a GPU)")
    attn: str = opt("", "plain, sdpa or triton (default: triton on a GPU, else sdpa)")
    seed: int = opt(0, "seeds the weights, the data order and the synthetic data")
    eval_every: int = opt(250, "steps between evaluations on 200 held-out records (all of them at the end)")
    save_every: int = opt(250, "steps between checkpoints (one is also written at the end; 0: none at all)")
    resume: bool = opt(False, "continue from OUT/latest: model, optimizer, schedule, step, data position, RNG")
    export: str = opt("", "also write the final model, without optimizer state, to this folder")


# ==== Data: records (unusable ones are skipped and counted), their order, a tokenizer trained on the corpus

def read_records(path, skip):
    """A JSON list of records (as M4-Instruct ships) or JSON Lines, whose lines that are not JSON are skipped."""
    text, items = pathlib.Path(path).read_text(), []
    with contextlib.suppress(json.JSONDecodeError):
        return json.loads(text)
    for n, line in enumerate(text.splitlines()):
        try:
            items += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as e:
            skip(f"{path} line {n + 1} is not JSON ({e})")
    return items


def to_sample(record, cfg, tokenizer, mcfg, skip, max_len=None):
    """A Sample, or None. One image goes multi-patch (as in the release) when the model has image_newline."""
    try:
        return interleave.record_to_sample(record, cfg.image_folder, tokenizer, mcfg, max_len,
                                           anyres=mcfg.has_image_newline)
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:   # interleave.InputError is a ValueError
        skip(f"record {record.get('id') if isinstance(record, dict) else record!r}: {e}")


def start_loader(run):   # in each loader process: the run's (cfg, tokenizer, model config), passed rather than
    global LOADER        # inherited so that spawning (macOS, Windows) works as forking does; one thread, as in
    LOADER = run         # torch's DataLoader
    torch.set_num_threads(1)


def prepare(record):
    """(Sample or None, why skipped) for the next step, pickled by value here, not as torch's shared-memory handles."""
    reasons = []
    return pickle.dumps((to_sample(record, *LOADER, reasons.append, LOADER[0].budget), reasons))


@functools.lru_cache(maxsize=2)
def permutation(n, seed, epoch):   # the record order of an epoch: the data position is then one integer
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def train_tokenizer(records, vocab_size=512):
    """Qwen2-style byte-level BPE trained on the corpus (deterministic), with the template's specials and <image>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    texts = [interleave.SYSTEM_PROMPT, "system\nuser\nassistant\n"] + [
        t["value"].replace("<image>", "\n") for r in records if isinstance(r, dict)
        for t in r.get("conversations") or [] if isinstance(t, dict) and isinstance(t.get("value"), str)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=
                                                       False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


# ==== Model: fresh or loaded; the checkpoint writer (llava-hf layout, the hub's key names)

def fresh_model(preset, tokenizer, seed, tower_steps=0, log=print):
    vision, text = interleave.VisionConfig(**PRESETS[preset][0]), interleave.TextConfig(**{
        "vocab": -(-tokenizer.get_vocab_size() // 64) * 64, "max_positions": 4096, "tie_embeddings": True,
        **PRESETS[preset][1]})
    canvases = [[vision.image_size * a, vision.image_size * b] for a, b in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]
    config = interleave.ModelConfig(vision, text, "hf", image_token_id=tokenizer.token_to_id("<image>"),
                                    grid_pinpoints=canvases, has_image_newline=True)   # the release's, per tile
    torch.manual_seed(seed)
    model = interleave.LlavaInterleave(config)
    for name, p in model.named_parameters():   # N(0, 0.02) weights, zero biases; norms stay 1 and 0
        if "norm" not in name:
            torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 or name == "image_newline" else torch.nn.init.zeros_(p)
    return pretrain_tower.pretrain(model, tower_steps, seed, log)   # stage 0, as the release's SigLIP; default: none


def hf_config(c):
    """interleave's ModelConfig -> llava-hf config.json, as interleave.config_from_dict and transformers read it."""
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "ignore_index": IGNORE,
            "image_token_index": c.image_token_id, "projector_hidden_act": "gelu", "multimodal_projector_bias":
            c.projector_bias, "vision_feature_layer": c.vision.feature_layer, "vision_feature_select_strategy": "full",
            "image_grid_pinpoints": c.grid_pinpoints, "tie_word_embeddings": c.text.tie_embeddings,
            "torch_dtype": "float32", "text_config": {"model_type": "qwen2", "hidden_act": "silu", **{
                hf: getattr(c.text, ours) for ours, hf in HF_NAMES["text"].items()}},
            "vision_config": {"model_type": "siglip_vision_model", "vision_use_head": False, **{
                hf: getattr(c.vision, ours) for ours, hf in HF_NAMES["vision"].items()}}}


def hub_key(ours):
    """Our module path -> the hub's llava-hf name: the inverse of interleave.our_key, checked on every key."""
    head, _, rest = ours.partition(".")
    if head == "vision":   # SigLIP nests embeddings., encoder. and mlp.
        rest = "embeddings." + rest if rest.startswith(("patch_", "position_")) else rest
        rest = "encoder." + rest.replace(".fc", ".mlp.fc") if rest.startswith("layers.") else rest
    rest = re.sub(r"\.(gate|up|down)_proj", r".mlp.\1_proj", rest)   # Qwen2 nests mlp.
    key = HUB_PREFIXES[head] + rest if head in HUB_PREFIXES else ours   # image_newline stays a top-level key
    assert interleave.our_key(key) == ours, (ours, key)
    return key


def atomic(path, write):
    """write(a temporary name), then rename: a reader sees the old file or the new one, never half of one."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path + ".tmp")   # left over from a crash
    write(path + ".tmp")
    os.replace(path + ".tmp", path)


def write_model(folder, model, tokenizer, trainer_state=None):
    """config.json, model.safetensors (fp32), tokenizer.json, generation_config.json, each written atomically."""
    os.makedirs(folder, exist_ok=True)
    tied = model.config.text.tie_embeddings   # then the hub's files have no lm_head (SPEC §1)
    tensors = {hub_key(k): t.detach().float().contiguous().cpu() for k, t in model.state_dict().items()
               if not (tied and k == "lm_head.weight")}
    atomic(os.path.join(folder, "model.safetensors"), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    stops = [tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
    for name, obj in (("config.json", hf_config(model.config)), ("generation_config.json", {
            "eos_token_id": stops, "pad_token_id": stops[1], "do_sample": False, "max_new_tokens": 64})):
        atomic(os.path.join(folder, name), lambda tmp: pathlib.Path(tmp).write_text(json.dumps(obj, indent=2)))
    atomic(os.path.join(folder, "tokenizer.json"), tokenizer.save)
    if trainer_state is not None:
        atomic(os.path.join(folder, "trainer_state.pt"), lambda tmp: torch.save(trainer_state, tmp))


def save_checkpoint(out, step, model, tokenizer, trainer_state):
    """OUT/step-N is written whole under a temporary name, then renamed, and only then does the link OUT/latest move
    to it: a crash at any moment leaves the last good checkpoint intact. The last two are kept."""
    name, tmp = f"step-{step:06d}", os.path.join(out, f".step-{step:06d}.tmp")
    write_model(tmp, model, tokenizer, trainer_state)
    shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    os.replace(tmp, os.path.join(out, name))
    atomic(os.path.join(out, "latest"), lambda link: os.symlink(name, link))
    [shutil.rmtree(os.path.join(out, old)) for old in sorted(d for d in os.listdir(out) if d.startswith("step-"))[:-2]]


# ==== Loss, FLOPs, evaluation, loss curve

class WithLoss(torch.nn.Module):
    """The model and its summed loss in one forward, for DDP. The head runs only where there is a label: the logits of
    every position of a 16k-token pack, with the releases' 152k vocabulary, would outweigh the 0.5B model."""
    def __init__(self, model, act_dtype=torch.float32):
        super().__init__()
        self.model, self.act_dtype = model, act_dtype

    def forward(self, ids, labels, pixels, sizes, positions, cu_seqlens=None):
        m = self.model   # in bf16 the residual stream is bf16 too, as in transformers' Qwen2 in bf16: the rotary
        x = m.embed(ids, pixels, sizes).to(self.act_dtype)   # tables follow its dtype, so q, k, v share one dtype
        hidden = m.decoder(x, positions, None, 0, cu_seqlens)[0, :-1]   # position t predicts token t + 1
        keep = labels[1:] != IGNORE
        return torch.nn.functional.cross_entropy(m.lm_head(hidden[keep]).float(), labels[1:][keep], reduction="sum")


def step_flops(model, packs, train_vision):
    """Model FLOPs of a step: 2 per multiply-add forward, twice that backward; recomputation is not counted."""
    c, n = model.config, lambda mod: sum(p.numel() for p in mod.parameters() if p.dim() > 1)
    views = sum(p.pixel_values.shape[0] for p in packs if p.pixel_values is not None)
    cu = [p.cu_seqlens.tolist() for p in packs]
    text = 6 * (n(model.decoder) - c.text.vocab * c.text.hidden) * sum(b[-1] for b in cu) \
        + 12 * c.text.layers * c.text.heads * c.text.head_dim * sum(t * (t + 1) // 2 for b in cu for t in np.diff(b)) \
        + 6 * c.text.hidden * c.text.vocab * sum(int((p.labels != IGNORE).sum()) for p in packs)   # the head
    s, matmuls = c.vision.tokens, n(model.vision) - model.vision.position_embedding.weight.numel()
    tower = (1 + 2 * train_vision) * views * (2 * matmuls * s + 4 * len(model.vision.layers) * c.vision.hidden * s * s)
    return int(text + tower + 6 * views * s * n(model.projector))


@torch.no_grad()
def evaluate(model, records, cfg, tokenizer, skip, device, step, log):
    """Held-out loss on the replies, and exact match of the greedy answer to the first reply, per metadata.task."""
    model.eval()
    stops, loss_sum, n_tokens, tasks = [tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")], 0.0, 0, {}
    cut = lambda ids: ids[:next((i for i, t in enumerate(ids) if t in stops or t == IGNORE), len(ids))]  # noqa: E731
    for record in records:
        sample = to_sample(record, cfg, tokenizer, model.config, skip)
        if sample is None or (sample.labels == IGNORE).all():
            continue
        ids, labels = sample.input_ids.to(device), sample.labels.to(device)
        pixels = None if sample.pixel_values is None else sample.pixel_values.to(device)
        positions = torch.arange(len(ids), device=device)[None]
        loss_sum += WithLoss(model)(ids[None], labels, pixels, sample.image_sizes, positions).item()
        n_tokens += int((labels != IGNORE).sum())
        first = int((labels != IGNORE).nonzero()[0])   # the prompt ends where the first reply starts
        reply = cut(labels[first:].tolist())
        new = model.generate(ids[None, :first], pixels, sample.image_sizes, max_new_tokens=len(reply) + 8,
                             stop_ids=stops, cuda_graph=False)[0].tolist()   # short answers: capturing costs more
        tasks.setdefault((record.get("metadata") or {}).get("task", "all"), []).append(
            tokenizer.decode(cut(new)).strip() == tokenizer.decode(reply).strip())
    model.train()
    accuracy = {task: sum(hits) / len(hits) for task, hits in sorted(tasks.items())}
    log(f"eval at step {step}: held-out loss {loss_sum / max(1, n_tokens):.4f} | exact match " +
        ", ".join(f"{task} {100 * a:.1f}%" for task, a in accuracy.items()), flush=True)
    return {"step": step, "loss": loss_sum / max(1, n_tokens), "accuracy": accuracy, "records": len(records)}


def plot(history, evals, path):
    """loss.png, log scale: the training loss of every step in blue, held-out evaluations in red."""
    w, h, pad, last, values = 720, 420, 50, history[-1][0], [loss for _, loss in history] + [e["loss"] for e in evals]
    lo, hi = math.log(max(min(values), 1e-6)), math.log(max(max(values), 1e-6))   # a loss may round to 0
    xy = lambda s, v: (pad + (w - 2 * pad) * s / last,   # noqa: E731
                       h - pad - (h - 2 * pad) * (math.log(max(v, 1e-6)) - lo) / (hi - lo or 1))
    draw = ImageDraw.Draw(image := Image.new("RGB", (w, h), "white"))
    draw.rectangle((pad, pad, w - pad, h - pad), outline="black")
    draw.line([xy(s, v) for s, v in history], fill=(40, 90, 200))
    for x, y in (xy(e["step"], e["loss"]) for e in evals):
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(210, 40, 40))
    draw.text((pad, 20), f"loss {math.exp(lo):.3g}..{math.exp(hi):.3g}, log scale, {last} steps: training blue, "
                         "held-out red", fill="black")
    atomic(path, lambda tmp: image.save(tmp, format="PNG"))


# ==== The run

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        kind = {"action": argparse.BooleanOptionalAction} if f.type is bool else {"type": type(f.default)}
        p.add_argument("--" + f.name.replace("_", "-"), default=f.default, help=f.metadata["help"], **kind)
    cfg, cuda = Config(**vars(p.parse_args(argv))), torch.cuda.is_available()
    # torchrun sets RANK; a single process gets a (gloo) process group of its own, so one code path serves both.
    single = {} if "RANK" in os.environ else dict(store=dist.HashStore(), rank=0, world_size=1)
    dist.init_process_group("nccl" if cuda and not single else "gloo", **single)
    try:
        return train(cfg, cuda, dist.get_rank(), dist.get_world_size())
    finally:
        dist.destroy_process_group()


def train(cfg, cuda, rank, world):
    started, log = time.time(), print if rank == 0 else (lambda *a, **k: None)
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    torch.cuda.set_device(device) if cuda else None
    bf16, skipped, latest = cuda if cfg.bf16 is None else cfg.bf16, [], os.path.join(cfg.out, "latest")

    def skip(why):   # an unusable record: counted, and the first few reasons printed
        skipped.append(why)
        if len(skipped) <= 5:
            print(f"skipped: {why}" + " (further reasons are not printed)" * (len(skipped) == 5), flush=True)
    if cfg.synthetic and not cfg.data:   # draw the synthetic M4 set (rank 0; the others wait at the barrier)
        cfg.data, cfg.val = os.path.join(cfg.out, "data", "train.json"), os.path.join(cfg.out, "data", "val.json")
        if rank == 0 and not (cfg.resume and os.path.exists(cfg.val)):
            make_m4.main(["--out", os.path.dirname(cfg.data), "--train", str(cfg.synthetic), "--seed", str(cfg.seed)])
    os.makedirs(cfg.out, exist_ok=True)
    dist.barrier()
    cfg.image_folder = cfg.image_folder or os.path.dirname(os.path.abspath(cfg.data))
    records, val = read_records(cfg.data, skip), read_records(cfg.val, skip) if cfg.val else []
    if not records:
        sys.exit(f"no usable records in {cfg.data}")
    state = torch.load(os.path.join(latest, "trainer_state.pt"), weights_only=False) if cfg.resume else None
    if cfg.init in PRESETS and not cfg.resume:
        tokenizer = train_tokenizer(records)   # deterministic: every process trains the same one
        model = fresh_model(cfg.init, tokenizer, cfg.seed, cfg.pretrain_tower, log)
    else:   # a checkpoint to fine-tune, or the last good one to resume (the rest from its trainer_state.pt)
        source = latest if cfg.resume else cfg.init
        model, tokenizer = interleave.load(source, dtype=torch.float32), interleave.load_tokenizer(source)
    model = model.to(device).train().set_attention(cfg.attn or ("triton" if cuda else "sdpa"))
    train_vision = cfg.init == "tiny" or cfg.train_vision   # a checkpoint (or its shape) keeps its tower frozen
    for name, p in model.vision.named_parameters():   # post_layernorm is stored but never applied (SPEC §1)
        p.requires_grad_(train_vision and not name.startswith("post_layernorm"))
    for block in [*model.decoder.layers, *model.vision.layers] if cfg.grad_ckpt else []:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() > 1], "weight_decay": 0.05},
                                   {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(0.9, 0.95), fused=cuda)
    wrapped = WithLoss(model, torch.bfloat16 if bf16 else torch.float32)
    if world > 1:   # some parameters may get no gradient: image_newline in a step without multi-patch
        wrapped = torch.nn.parallel.DistributedDataParallel(wrapped, find_unused_parameters=True)
    step, position, history, evals = state["progress"] if state else (0, 0, [], [])
    if state:   # resuming: the optimizer's moments and the random generators too
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        torch.cuda.set_rng_state(state["cuda_rng"], device) if cuda else None
    peak = next((v for k, v in PEAK_TFLOPS.items() if cuda and k in torch.cuda.get_device_name(device)), None)
    log(f"{sum(p.numel() for p in params):,} trained weights, {len(records)} records, {world}x {device}, step {step}")
    meter = np.zeros(6)   # since the last log line: seconds, tokens, FLOPs, packed tokens, pack room, steps
    n, workers = len(records), min(8, os.cpu_count())   # processes: threads would hold the GIL the model's Python needs
    loader = ProcessPoolExecutor(workers, initializer=start_loader, initargs=((cfg, tokenizer, model.config),))
    load = lambda start: [loader.submit(prepare, records[permutation(n, cfg.seed, i // n)[i % n]])   # noqa: E731
                          for i in range(start + rank, start + cfg.batch, world)]   # this process's share: futures
    upcoming = load(position)
    while step < cfg.steps:
        progress = min(1.0, max(0, step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))   # linear warmup, then a
        lr = cfg.lr * min((step + 1) / cfg.warmup, 0.1 + 0.45 * (1 + math.cos(math.pi * progress)))   # cosine to 10%
        t0, prepared, position = time.time(), [pickle.loads(f.result()) for f in upcoming], position + cfg.batch
        upcoming, samples = load(position) if step + 1 < cfg.steps else None, [s for s, _ in prepared]
        [skip(why) for _, reasons in prepared for why in reasons]
        optimizer.param_groups[0]["lr"] = optimizer.param_groups[1]["lr"] = lr
        packs = interleave.pack_samples([s for s in samples if s], cfg.budget, verbose=False) or [interleave.Sample(
            torch.tensor([0, 0]), torch.full((2,), IGNORE), None, [], torch.arange(2),
            torch.tensor([0, 2], dtype=torch.int32))]   # no usable sample here: a pack without loss keeps DDP in step
        count = torch.tensor([float(sum(int((p.labels != IGNORE).sum()) for p in packs))], device=device)
        total = torch.zeros(1, device=device)
        dist.all_reduce(count)
        for i, p in enumerate(packs):   # gradient accumulation; DDP syncs the gradients at the last pack only
            with (wrapped.no_sync() if world > 1 and i < len(packs) - 1 else contextlib.nullcontext()), \
                    torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = wrapped(p.input_ids[None].to(device), p.labels.to(device),
                               None if p.pixel_values is None else p.pixel_values.to(device), p.image_sizes,
                               p.position_ids[None].to(device), p.cu_seqlens.to(device))
            (loss * world / count.clamp(min=1)).backward()   # the mean over all tokens; DDP divides by world
            total += loss.detach()
        dist.all_reduce(total)
        loss_value, grad_norm = (total / count.clamp(min=1)).item(), torch.nn.utils.clip_grad_norm_(params, 1.0)
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):   # before the update: the weights stay good
            sys.exit(f"step {step + 1}: loss {loss_value}, gradient norm {grad_norm}: stopping; the last good "
                     f"checkpoint is {os.path.realpath(latest) if os.path.exists(latest) else 'none yet'}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        history.append((step, loss_value))
        real = sum(len(p.input_ids) for p in packs)
        meter += (time.time() - t0, real * world, step_flops(model, packs, train_vision) * world, real,
                  len(packs) * cfg.budget, 1)
        if step % 10 == 0 or step == cfg.steps:
            dt, mfu = meter[0], f"{100 * meter[2] / meter[0] / (peak * 1e12 * world):.1f}%" if peak else "n/a"
            log(f"step {step}/{cfg.steps} | loss {loss_value:.4f} | lr {lr:.2e} | grad norm {grad_norm:.2f} | "
                f"{meter[1] / dt:,.0f} tok/s | MFU {mfu} | packing {100 * meter[3] / meter[4]:.1f}% | "
                f"ETA {dt / meter[5] * (cfg.steps - step) / 60:.1f} min | skipped {len(skipped)}", flush=True)
            meter[:] = 0
        if rank == 0 and val and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            evals.append(evaluate(model, val[:200], cfg, tokenizer, skip, device, step, log))
        if rank == 0 and cfg.save_every and (step % cfg.save_every == 0 or step == cfg.steps):
            save_checkpoint(cfg.out, step, model, tokenizer, {
                "progress": (step, position, history, evals), "optimizer": optimizer.state_dict(),
                "config": asdict(cfg), "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if cuda else None})
        dist.barrier()
    if rank == 0:   # the final evaluation on every held-out record, the loss curve, the exported model
        evals += [evaluate(model, val, cfg, tokenizer, skip, device, step, log)] if val else []
        plot(history, evals, os.path.join(cfg.out, "loss.png"))
        write_model(cfg.export, model, tokenizer) if cfg.export else None
    loader.shutdown()
    log(f"done: {step} steps in {(time.time() - started) / 60:.1f} min, {len(skipped)} records skipped")
    return {"model": model, "tokenizer": tokenizer, "history": history, "evals": evals, "skipped": len(skipped)}


if __name__ == "__main__":
    main()
