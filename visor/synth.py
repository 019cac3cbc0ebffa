"""The built-in benchmark: generated offline, deterministic by seed, short exact-match answers.

Three families of tasks on rendered images (DejaVu fonts from matplotlib, handwritten digits from
scikit-learn's ``load_digits``):

- hard (fine-grained; the answer lives in a small region): the value in a named row of a table,
  the digit in cell (r, c) of a grid of handwritten digits, the digit inside the red box (8 x 8 grid;
  size // 16 cells a side under 128 pixels), the value printed on a named bar of a chart, the k-th
  word of line l of a page;
- reasoning (the answer's region is found through another one): the digit left of the red box;
- easy (global; the gist is enough): the dominant colour, the number of large shapes, chart or
  table, the quadrant holding the only object.

``make_dataset`` writes ``images/<split>/*.png``, ``train/val/test.jsonl`` (the training
format: ``{"image", "question", "answer"}`` plus ``task``, ``family``, ``meta``) and a dataset
card. Every record's ``meta`` holds the rendering parameters its answer follows from.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import cache
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import checks
from .errors import ConfigError
from .outputs import write_dir

COLOURS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 119, 180),
    "yellow": (230, 200, 20),
    "purple": (148, 103, 189),
    "orange": (255, 127, 14),
}
NAMES = ["apple", "pear", "plum", "lime", "fig", "kiwi", "mango", "melon", "grape", "peach", "lemon", "cherry"]
WORDS = [
    "river",
    "stone",
    "cloud",
    "paper",
    "glass",
    "light",
    "north",
    "table",
    "chair",
    "green",
    "quiet",
    "sharp",
    "bread",
    "music",
    "ocean",
    "tiger",
    "house",
    "dream",
    "apple",
    "train",
    "wheel",
    "spoon",
    "field",
    "smile",
]
QUADRANTS = ["top left", "top right", "bottom left", "bottom right"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth"]
WHITE = (255, 255, 255)


@cache
def font(size: int) -> ImageFont.FreeTypeFont:
    from matplotlib import font_manager

    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


@cache
def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()  # bundled with scikit-learn: no download
    return d.images, d.target


def digit_image(index: int, size: int) -> Image.Image:
    """A handwritten digit (dark ink on white), upscaled from 8x8."""
    pixels = 255 - (digits()[0][index] * (255 / 16)).astype(np.uint8)
    return Image.fromarray(pixels).resize((size, size), Image.BILINEAR).convert("RGB")


@dataclass
class Item:
    image: Image.Image
    question: str
    answer: str
    meta: dict


# ---- hard: the answer lives in a small region ----------------------------------------------------


def table_value(rng: random.Random, size: int) -> Item:
    rows = rng.sample(NAMES, 8)
    values = [rng.randint(10, 99) for _ in rows]
    im = Image.new("RGB", (size, size), WHITE)
    d = ImageDraw.Draw(im)
    h, f = size // (len(rows) + 1), font(max(8, size // 22))
    d.text((8, 4), "item", fill=(0, 0, 0), font=f)
    d.text((size // 2 + 8, 4), "value", fill=(0, 0, 0), font=f)
    for i, (name, value) in enumerate(zip(rows, values), 1):
        d.line([(0, i * h), (size, i * h)], fill=(120, 120, 120))
        d.text((8, i * h + 4), name, fill=(0, 0, 0), font=f)
        d.text((size // 2 + 8, i * h + 4), str(value), fill=(0, 0, 0), font=f)
    d.line([(size // 2, 0), (size // 2, size)], fill=(120, 120, 120))
    k = rng.randrange(len(rows))
    return Item(
        im,
        f"What is the value in the row labelled {rows[k]}?",
        str(values[k]),
        {"rows": rows, "values": values, "asked": k},
    )


def _digit_grid(rng: random.Random, size: int, n: int = 4) -> tuple[Image.Image, list[list[int]], list[list[int]]]:
    images, targets = digits()
    cell = size // n
    im = Image.new("RGB", (size, size), WHITE)
    labels, indices = [], []
    for r in range(n):
        labels.append([]), indices.append([])
        for c in range(n):
            idx = rng.randrange(len(images))
            im.paste(digit_image(idx, cell - 4), (c * cell + 2, r * cell + 2))
            labels[r].append(int(targets[idx]))
            indices[r].append(idx)
    return im, labels, indices


def grid_digit(rng: random.Random, size: int) -> Item:
    im, labels, indices = _digit_grid(rng, size)
    r, c = rng.randrange(4), rng.randrange(4)
    return Item(
        im,
        f"Which digit is in row {r + 1}, column {c + 1}?",
        str(labels[r][c]),
        {"labels": labels, "indices": indices, "row": r, "col": c},
    )


def marked_grid(size: int) -> int:
    """Cells per side of the red-box grids: 8, or fewer on images under 128 pixels (cells of 16)."""
    return min(8, size // 16)


def marked_digit(rng: random.Random, size: int) -> Item:
    """One cell of an 8 x 8 grid of handwritten digits has a red box: 64 candidates, one read (fewer
    on small images, see ``marked_grid``)."""
    n = marked_grid(size)
    im, labels, indices = _digit_grid(rng, size, n)
    return _boxed(im, labels, indices, rng.randrange(n), rng.randrange(n), size)


def _boxed(im: Image.Image, labels, indices, r: int, c: int, size: int) -> Item:
    """A red box drawn around cell (r, c) of a digit grid."""
    cell = size // len(labels)
    ImageDraw.Draw(im).rectangle(
        [c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], outline=COLOURS["red"], width=max(1, size // 96)
    )
    return Item(
        im,
        "Which digit is in the red box?",
        str(labels[r][c]),
        {"labels": labels, "indices": indices, "row": r, "col": c},
    )


def left_of_mark(rng: random.Random, size: int) -> Item:
    """The red-box grid, asking for the box's left-hand neighbour: the answer's cell carries no mark of
    its own, so it is found through the relation between two cells (reasoning)."""
    n = marked_grid(size)
    im, labels, indices = _digit_grid(rng, size, n)
    r, c = rng.randrange(n), 1 + rng.randrange(n - 1)  # the box is never in the first column
    item = _boxed(im, labels, indices, r, c, size)
    return Item(item.image, "Which digit is left of the red box?", str(labels[r][c - 1]), item.meta)


def bar_value(rng: random.Random, size: int) -> Item:
    names = rng.sample(NAMES, 5)
    values = [rng.randint(10, 99) for _ in names]
    im = Image.new("RGB", (size, size), WHITE)
    d = ImageDraw.Draw(im)
    f = font(max(8, size // 24))
    width, base = size // len(names), size - size // 8
    for i, (name, value) in enumerate(zip(names, values)):
        top = base - int(value / 100 * (base - size // 6))
        d.rectangle([i * width + width // 5, top, (i + 1) * width - width // 5, base], fill=COLOURS["blue"])
        d.text((i * width + width // 5, top - size // 18), str(value), fill=(0, 0, 0), font=f)
        d.text((i * width + 2, base + 4), name, fill=(0, 0, 0), font=f)
    d.line([(0, base), (size, base)], fill=(0, 0, 0))
    k = rng.randrange(len(names))
    return Item(
        im,
        f"What value is written on the {names[k]} bar?",
        str(values[k]),
        {"names": names, "values": values, "asked": k},
    )


def word_at(rng: random.Random, size: int) -> Item:
    lines = [rng.sample(WORDS, 4) for _ in range(6)]
    im = Image.new("RGB", (size, size), WHITE)
    d = ImageDraw.Draw(im)
    f, h = font(max(8, size // 20)), size // len(lines)
    for i, words in enumerate(lines):
        d.text((6, i * h + h // 4), " ".join(words), fill=(0, 0, 0), font=f)
    line, k = rng.randrange(len(lines)), rng.randrange(4)
    return Item(
        im,
        f"What is the {ORDINALS[k]} word of line {line + 1}?",
        lines[line][k],
        {"lines": lines, "line": line, "word": k},
    )


# ---- easy: the gist is enough ---------------------------------------------------------------------


def dominant_colour(rng: random.Random, size: int) -> Item:
    name = rng.choice(sorted(COLOURS))
    im = Image.new("RGB", (size, size), COLOURS[name])
    d = ImageDraw.Draw(im)
    others = [c for c in sorted(COLOURS) if c != name]
    for _ in range(rng.randint(2, 5)):  # small patches of other colours, well under half the area
        x, y, s = rng.randrange(size), rng.randrange(size), rng.randint(size // 16, size // 8)
        d.rectangle([x, y, x + s, y + s], fill=COLOURS[rng.choice(others)])
    return Item(im, "Which colour dominates the image?", name, {"colour": name})


def count_shapes(rng: random.Random, size: int) -> Item:
    n = rng.randint(1, 5)
    im = Image.new("RGB", (size, size), WHITE)
    d = ImageDraw.Draw(im)
    cells = rng.sample(range(9), n)  # one shape per cell of a 3x3 layout: they never touch
    step = size // 3
    for cell in cells:
        r, c = divmod(cell, 3)
        pad = step // 8
        box = [c * step + pad, r * step + pad, (c + 1) * step - pad, (r + 1) * step - pad]
        colour = COLOURS[rng.choice(sorted(COLOURS))]
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=colour)
    return Item(im, "How many large shapes are there?", str(n), {"cells": cells})


def chart_or_table(rng: random.Random, size: int) -> Item:
    kind = rng.choice(["chart", "table"])
    item = (bar_value if kind == "chart" else table_value)(rng, size)
    return Item(item.image, "Is this a chart or a table?", kind, {"kind": kind})


def quadrant(rng: random.Random, size: int) -> Item:
    q = rng.randrange(4)
    im = Image.new("RGB", (size, size), WHITE)
    half, s = size // 2, rng.randint(size // 10, size // 5)
    x = (q % 2) * half + rng.randrange(4, half - s - 4)
    y = (q // 2) * half + rng.randrange(4, half - s - 4)
    ImageDraw.Draw(im).ellipse([x, y, x + s, y + s], fill=COLOURS[rng.choice(sorted(COLOURS))])
    return Item(im, "Which quadrant holds the object?", QUADRANTS[q], {"quadrant": q, "box": [x, y, s]})


TASKS = {
    "table_value": ("hard", table_value),
    "grid_digit": ("hard", grid_digit),
    "marked_digit": ("hard", marked_digit),
    "bar_value": ("hard", bar_value),
    "word_at": ("hard", word_at),
    "left_of_mark": ("reasoning", left_of_mark),
    "dominant_colour": ("easy", dominant_colour),
    "count_shapes": ("easy", count_shapes),
    "chart_or_table": ("easy", chart_or_table),
    "quadrant": ("easy", quadrant),
}
SPLITS = ("train", "val", "test")


def make_item(task: str, seed: int, split: str, index: int, size: int) -> Item:
    """One sample, a pure function of its arguments."""
    rng = random.Random(f"{seed}:{split}:{task}:{index}")
    return TASKS[task][1](rng, size)


def _write(job) -> dict:
    out, task, seed, split, index, size = job
    item = make_item(task, seed, split, index, size)
    name = f"images/{split}/{task}_{index:05d}.png"
    item.image.save(out / name, compress_level=1)
    return {
        "image": name,
        "question": item.question,
        "answer": item.answer,
        "task": task,
        "family": TASKS[task][0],
        "meta": item.meta,
    }


MIN_IMAGE_SIZE = 64  # smaller images can't hold a 4 x 4 grid of 16-pixel digits


def make_dataset(
    out: str | Path,
    seed: int = 0,
    sizes: dict | None = None,
    tasks: list[str] | None = None,
    image_size: int = 384,
    workers: int = 2,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Generate the benchmark; ``sizes``: samples per task per split. Returns the dataset card.
    The set is rendered beside ``out`` and swapped in when complete (``overwrite``: replace an
    earlier data set of visor's there; anything else at ``out`` is refused, see visor.outputs)."""
    tasks = tasks or list(TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    sizes = sizes or {"train": 800, "val": 100, "test": 200}
    for split in SPLITS:
        checks.count(f"samples per task of {split}", sizes.get(split, 0))
    if sum(sizes.get(split, 0) for split in SPLITS) == 0:
        raise ConfigError("no samples to make: give --train, --val or --test a positive number")
    checks.count("image_size", image_size, MIN_IMAGE_SIZE)
    checks.count("workers", workers, 1)
    card: dict = {}

    def build(tmp: Path) -> None:
        card.update(_render(tmp, seed, sizes, tasks, image_size, workers, progress))

    write_dir(out, "data make", build, overwrite=overwrite)
    return card


def _render(out: Path, seed: int, sizes: dict, tasks: list[str], image_size: int, workers: int, progress: bool) -> dict:
    from tqdm.auto import tqdm

    jobs = []
    for split in SPLITS:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        jobs += [(out, task, seed, split, i, image_size) for task in tasks for i in range(sizes.get(split, 0))]
    with Pool(workers) as pool:
        records = list(
            tqdm(pool.imap(_write, jobs, chunksize=32), total=len(jobs), desc="rendering", disable=not progress)
        )
    card = {
        "seed": seed,
        "image_size": image_size,
        "tasks": {t: TASKS[t][0] for t in tasks},
        "samples_per_task": sizes,
        "total": len(records),
    }
    for split in SPLITS:
        rows = [r for r in records if r["image"].startswith(f"images/{split}/")]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = [
        f"# visor built-in benchmark (seed {seed})",
        "",
        f"Images {image_size}x{image_size}; samples per task: {sizes}; {len(records)} in all.",
        "",
        "| task | family | example question |",
        "|---|---|---|",
    ]
    for t in tasks:
        lines.append(f"| {t} | {TASKS[t][0]} | {make_item(t, seed, 'test', 0, 64).question} |")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card
