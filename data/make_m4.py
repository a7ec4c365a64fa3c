"""A synthetic M4-Instruct data set, drawn with Pillow: one task family per scenario of the paper (docs/MODEL.md §5).

    python data/make_m4.py --out data/m4 --train 2000 --val 100 --seed 0      # counts are per task family
    python data/make_m4.py --out data/m4 --bench 25                           # a bench file for sample.py --bench

Writes OUT/train.json and OUT/val.json (LLaVA / M4-Instruct records; the image paths are relative to OUT) and the
pictures under OUT/train/ and OUT/val/. Everything follows from --seed: each record draws from its own random
generator, seeded by (seed, split, task, index), so the held-out split never shares a generator with training.

The tasks are made for a tiny model trained from scratch: plain shapes in saturated colours, answers of one word or
one digit, a few choices each. A --perception fraction of the training records ask, about the same pictures, what
they show instead of the task's question ("Describe the images." "red circle, red square, red circle"; the moving
shape; the small mark; which colours are in the scene): a model that learns its vision from scratch gets direct
signal about the pictures, in one question form that all four families share. The held-out split asks only the
tasks' questions.
- multi_image: three pictures of one shape, one of them differs in shape or colour: which one? (1, 2 or 3)
- video: a shape moves across 8 frames (the question samples 4): which way? (left, right, up or down)
- multi_view: 1 to 3 solids on a floor, seen from the front, the side and above: how many? Solids may hide each
  other in the low views, never from above.
- multi_patch: one large picture (2x the base size on one or both sides) with one small mark: which shape is it?
  The mark lies inside one of the size x size tiles that multi-patch cuts (never across two); the squashed base
  view shrinks it to half its size (8 to 10 pixels), the tile keeps it whole.
"""
import argparse
import json
import math
import multiprocessing
import os
import random

from PIL import Image, ImageDraw

TASKS = ("multi_image", "video", "multi_view", "multi_patch")
COLOURS = {"red": (215, 35, 35), "green": (30, 160, 60), "blue": (35, 75, 215), "yellow": (235, 195, 20)}
SHAPES = ("circle", "square", "triangle")
SOLIDS = ("cube", "sphere", "cylinder")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SUPER = 4   # draw at 4x and downsample: smooth edges, sub-pixel positions


def jitter(rng, colour, amount=12):
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in colour)


def canvas(rng, width, height):
    """A mid-grey, randomly tinted background (about 0 after the -1..1 normalisation) at SUPER x the final size."""
    image = Image.new("RGB", (width * SUPER, height * SUPER), tuple(rng.randint(100, 150) for _ in range(3)))
    return image, ImageDraw.Draw(image)


def finish(image):
    return image.resize((image.width // SUPER, image.height // SUPER), Image.LANCZOS)


def draw_shape(draw, shape, cx, cy, r, fill):
    """A flat shape of radius r (final pixels) centred at (cx, cy)."""
    cx, cy, r = cx * SUPER, cy * SUPER, r * SUPER
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":   # as wide as the circle: at 0.85 r the two differed by a few corner pixels
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)], fill=fill)


def multi_image(rng, size):
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    odd, by = rng.randrange(3), rng.choice(("shape", "colour"))
    images, drawn = [], []
    for i in range(3):
        s, c = shape, colour
        if i == odd and by == "shape":
            s = rng.choice([x for x in SHAPES if x != shape])
        elif i == odd:
            c = rng.choice([x for x in COLOURS if x != colour])
        image, draw = canvas(rng, size, size)
        r = rng.uniform(0.14, 0.24) * size
        draw_shape(draw, s, rng.uniform(r, size - r), rng.uniform(r, size - r), r, jitter(rng, COLOURS[c]))
        images.append(finish(image))
        drawn.append((s, c))
    question = ("Image 1: <image>\nImage 2: <image>\nImage 3: <image>\n"
                "One of these images is different from the other two. Which one? Answer with its number.")
    about = [("Describe the images.", ", ".join(f"{c} {s}" for s, c in drawn))]   # every picture's shape and colour
    return images, question, str(odd + 1), {"differs_in": by}, about


def video(rng, size, n_frames=8):
    name = rng.choice(list(DIRECTIONS))
    (dx, dy), shape, colour = DIRECTIONS[name], rng.choice(SHAPES), rng.choice(list(COLOURS))
    r, step = rng.uniform(0.12, 0.18) * size, rng.uniform(0.05, 0.07) * size    # travels 35-50% of the frame
    travel = step * (n_frames - 1)
    lo, hi = r + 1, size - r - 1
    start = [rng.uniform(lo, hi), rng.uniform(lo, hi)]
    for axis, d in enumerate((dx, dy)):   # along the motion, start where the whole path stays inside the frame
        if d:
            start[axis] = rng.uniform(lo, hi - travel) if d > 0 else rng.uniform(lo + travel, hi)
    background, frames, fill = tuple(rng.randint(100, 150) for _ in range(3)), [], jitter(rng, COLOURS[colour])
    for t in range(n_frames):
        image = Image.new("RGB", (size * SUPER, size * SUPER), background)
        draw_shape(ImageDraw.Draw(image), shape, start[0] + dx * step * t, start[1] + dy * step * t, r, fill)
        frames.append(finish(image))
    question = "<image>" * 4 + "\nWhich way does the shape move? Answer left, right, up or down."
    return frames, question, name, {"frames": n_frames}, [("Describe the moving shape.", f"{colour} {shape}")]


def render_view(rng, size, objects, azimuth, elevation):
    """Orthographic view of solids standing on a floor: rotate by azimuth about the vertical, tilt by elevation
    (90 = straight from above), draw the farthest first so nearer solids hide what is behind them."""
    image, draw = canvas(rng, size, size)
    a, e, unit = math.radians(azimuth), math.radians(elevation), size / 4.6
    ce, se, k = math.cos(e), math.sin(e), SUPER
    placed = []
    for x, z, solid, colour, radius in objects:
        u = x * math.cos(a) - z * math.sin(a)
        depth = x * math.sin(a) + z * math.cos(a)   # larger is nearer the camera
        cx, cy = size / 2 + u * unit, size / 2 + (depth * se + 0.35 * ce) * unit
        placed.append((depth, cx * k, cy * k, solid, colour, radius * unit * k))
    for depth, cx, cy, solid, colour, r in sorted(placed):
        light, dark = tuple(min(255, c + 60) for c in colour), tuple(int(c * 0.7) for c in colour)
        h = 2 * r * ce                       # the height on screen; 0 from above
        if solid == "sphere":
            draw.ellipse((cx - r, cy - h / 2 - r, cx + r, cy - h / 2 + r), fill=colour)
            draw.ellipse((cx - r / 2, cy - h / 2 - r / 2, cx, cy - h / 2), fill=light)
        elif solid == "cube":
            draw.rectangle((cx - r, cy - h, cx + r, cy + r * se), fill=dark)                 # front face
            draw.rectangle((cx - r, cy - h - r * se, cx + r, cy - h + r * se), fill=colour)  # top face
        else:                                # cylinder: side, then the top ellipse
            draw.rectangle((cx - r, cy - h, cx + r, cy), fill=dark)
            draw.ellipse((cx - r, cy - r * se, cx + r, cy + r * se), fill=dark)
            draw.ellipse((cx - r, cy - h - r * se, cx + r, cy - h + r * se), fill=colour)
    return finish(image)


def multi_view(rng, size):
    n = rng.randint(1, 3)
    cells = rng.sample([(x, z) for x in (-1, 0, 1) for z in (-1, 0, 1)], n)
    colours = rng.sample(list(COLOURS.values()), n)
    objects = [(x + rng.uniform(-0.12, 0.12), z + rng.uniform(-0.12, 0.12), rng.choice(SOLIDS),
                jitter(rng, colour), rng.uniform(0.34, 0.42)) for (x, z), colour in zip(cells, colours)]
    turn = rng.uniform(-20, 20)
    views = [render_view(rng, size, objects, turn + azimuth, elevation)
             for azimuth, elevation in ((0, 20), (90, 20), (0, 90))]
    question = ("View 1: <image>\nView 2: <image>\nView 3: <image>\n"
                "These are three views of one scene. How many objects are in the scene?")
    present = {name for name, value in COLOURS.items() if value in colours}
    about = [("Which colours are in the scene?", " ".join(sorted(present)))]
    return views, question, str(n), {"solids": [o[2] for o in objects]}, about


def multi_patch(rng, size):
    width, height = rng.choice(((2 * size, 2 * size), (2 * size, size), (size, 2 * size)))
    image, draw = canvas(rng, width, height)
    shape, colour, r = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.uniform(0.12, 0.15) * size
    left, top = rng.randrange(0, width, size), rng.randrange(0, height, size)   # inside one tile, never cut in two
    draw_shape(draw, shape, left + rng.uniform(r + 2, size - r - 2), top + rng.uniform(r + 2, size - r - 2), r,
               jitter(rng, COLOURS[colour]))
    question = "<image>\nWhat is the shape of the small mark? Answer circle, square or triangle."
    about = [("Describe the small mark.", f"{colour} {shape}")]
    return [finish(image)], question, shape, {"size": [width, height]}, about


MAKERS = {"multi_image": multi_image, "video": video, "multi_view": multi_view, "multi_patch": multi_patch}


def make_example(task, seed, split, index, size=64):
    """(images, question, answer, metadata, perception) of one example; the same arguments draw the same example.
    perception: (question, answer) pairs about what the pictures show."""
    return MAKERS[task](random.Random(f"{seed}/{split}/{task}/{index}"), size)


def atomic_save(image, path):
    image.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


def atomic_json(records, path):
    """Write the records as one JSON list through a temporary name, so a file is never half-written."""
    with open(path + ".tmp", "w") as f:
        json.dump(records, f, indent=1)
    os.replace(path + ".tmp", path)


def write_example(out, split, task, i, seed, size, perception):
    """Draw example i of a task, save its pictures, return its record."""
    folder = os.path.join(out, split, task)
    images, question, answer, meta, about = make_example(task, seed, split, i, size)
    rid, rng = f"{split}-{task}-{i:06d}", random.Random(f"{seed}/{split}/{task}/{i}/question")
    asks = "perception" if rng.random() < perception else "task"
    if asks == "perception":   # a question about what the pictures show, instead of the task's
        asked, answer = rng.choice(about)
        question = question[:question.rindex("\n") + 1] + asked   # the same images and markers
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    record = {"id": rid, "conversations": turns, "metadata": {"task": task, "asks": asks, **meta}}
    if task == "video":   # a folder of frames; the question's 4 markers sample 4 of them
        os.makedirs(os.path.join(folder, rid), exist_ok=True)
        for t, frame in enumerate(images):
            atomic_save(frame, os.path.join(folder, rid, f"frame_{t:02d}.png"))
        record["video"] = f"{split}/{task}/{rid}"
    else:
        names = [f"{split}/{task}/{rid}_{j}.png" for j in range(len(images))]
        for name, image in zip(names, images):
            atomic_save(image, os.path.join(out, name))
        record["image"] = names[0] if len(names) == 1 else names
    return record


def write_split(out, split, count, seed, size, perception=0.0, workers=1):
    """Every example is drawn from its own seed, so the records are the same for any number of worker processes."""
    jobs = [(out, split, task, i, seed, size, perception) for task in TASKS for i in range(count)]
    for task in TASKS:
        os.makedirs(os.path.join(out, split, task), exist_ok=True)
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.Pool(workers) as pool:
            records = pool.starmap(write_example, jobs, chunksize=64)
    else:
        records = [write_example(*job) for job in jobs]
    random.Random(f"{seed}/{split}/order").shuffle(records)
    path = os.path.join(out, f"{split}.json")
    atomic_json(records, path)
    return path


# ---- the bench: the tasks as LLaVA-Interleave Bench records (sample.py --bench asks them)
BENCH_KINDS = ("task", "choice", "describe")
OPTIONS = {"multi_image": ["1", "2", "3"], "video": list(DIRECTIONS), "multi_view": ["1", "2", "3"],
           "multi_patch": list(SHAPES)}
LETTERS = "ABCDEFGH"
VIDEO_FRAMES = 4   # as the video question's 4 markers sample them: np.linspace(0, 7, 4, dtype=int)


def bench_question(rng, task, question, answer, about, kind):
    """(question, answer, question_type) of one bench record. task: the question the model was trained on, open-ended;
    choice: the same question without its "Answer ..." instruction, the answers as lettered options in a random
    order, multi-choice; describe: the question about what the pictures show, open-ended (scored by ROUGE-L)."""
    head, _, asked = question.rpartition("\n")   # the markers' lines, then the question's line
    if kind == "task":
        return question, answer, "open-ended"
    if kind == "describe":
        about_question, description = about[0]
        return f"{head}\n{about_question}", description, "open-ended"
    options = list(OPTIONS[task])
    rng.shuffle(options)
    lettered = "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))
    asked = asked.split(" Answer")[0]
    choose = "Answer with the option's letter from the given choices directly."
    return f"{head}\n{asked}\n{lettered}\n{choose}", LETTERS[options.index(answer)], "multi-choice"


def write_bench_example(out, task, i, seed, size):
    """Draw example i of a task from the "bench" split (never a training or held-out picture), save its pictures
    once, return its records, one of each kind."""
    images, question, answer, _, about = make_example(task, seed, "bench", i, size)
    if task == "video":   # the frames the question's markers sample, as files
        frames = [int(k * (len(images) - 1) / (VIDEO_FRAMES - 1)) for k in range(VIDEO_FRAMES)]
        images = [images[k] for k in frames]
    names = [f"bench/{task}/{i:04d}_{j}.png" for j in range(len(images))]
    for name, image in zip(names, images):
        atomic_save(image, os.path.join(out, name))
    records = []
    for kind in BENCH_KINDS:
        rng = random.Random(f"{seed}/bench/{task}/{i}/{kind}")
        asked, expected, question_type = bench_question(rng, task, question, answer, about, kind)
        dataset = task if kind == "task" else f"{task}-{kind}"
        turns = [{"from": "human", "value": asked}, {"from": "gpt", "value": expected}]
        records.append({"sample_id": f"{dataset}-{i:04d}", "image": names, "conversations": turns,
                        "metadata": {"dataset": dataset, "question_type": question_type}})
    return records


def write_bench(out, count, seed, size):
    """OUT/bench.json: count examples per task family, each asked three ways (BENCH_KINDS), grouped by dataset."""
    by_kind = {kind: [] for kind in BENCH_KINDS}
    for task in TASKS:
        os.makedirs(os.path.join(out, "bench", task), exist_ok=True)
        examples = [write_bench_example(out, task, i, seed, size) for i in range(count)]
        for kind_index, kind in enumerate(BENCH_KINDS):
            by_kind[kind] += [records[kind_index] for records in examples]
    records = [record for kind in BENCH_KINDS for record in by_kind[kind]]
    path = os.path.join(out, "bench.json")
    atomic_json(records, path)
    return path, len(records)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for train.json, val.json and the pictures")
    parser.add_argument("--train", type=int, default=2000, help="training examples per task family")
    parser.add_argument("--val", type=int, default=100, help="held-out examples per task family")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="side of a picture in pixels (multi-patch: 2x)")
    parser.add_argument("--perception", type=float, default=0.5,
                        help="fraction of the training records that ask what the pictures show instead")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes drawing pictures (the records do not depend on it)")
    parser.add_argument("--bench", type=int, metavar="N",
                        help="write only OUT/bench.json, a LLaVA-Interleave Bench file: N examples per task family, "
                             "each asked as trained, as lettered options and for a description (pictures in OUT/bench)")
    args = parser.parse_args(argv)
    if args.bench is not None:
        path, n = write_bench(args.out, args.bench, args.seed, args.size)
        print(f"wrote {path}: {n} records")
        return
    for split, count, perception in (("train", args.train, args.perception), ("val", args.val, 0.0)):
        path = write_split(args.out, split, count, args.seed, args.size, perception, args.workers)
        print(f"wrote {path}: {count} x {len(TASKS)} records")


if __name__ == "__main__":
    main()
