"""The built-in benchmark: deterministic, and every answer recoverable from its image."""

import hashlib
import json
import re

import numpy as np
import pytest
from PIL import Image

from visor.synth import COLOURS, QUADRANTS, TASKS, digits, make_dataset

SIZES = {"train": 2, "val": 1, "test": 6}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    make_dataset(out, seed=3, sizes=SIZES, image_size=128, workers=1, progress=False)
    return out


def records(root, split="test"):
    return [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()]


def pixels(root, record):
    return np.asarray(Image.open(root / record["image"]).convert("RGB")).astype(int)


def test_same_seed_same_bytes(bench, tmp_path):
    make_dataset(tmp_path, seed=3, sizes=SIZES, image_size=128, workers=2, progress=False)
    files = sorted(p.relative_to(bench) for p in bench.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    digest = lambda root, f: hashlib.sha256((root / f).read_bytes()).hexdigest()  # noqa: E731
    assert all(digest(bench, f) == digest(tmp_path, f) for f in files)
    other = tmp_path / "other"
    make_dataset(other, seed=4, sizes=SIZES, image_size=128, workers=1, progress=False)
    assert (other / "test.jsonl").read_text() != (bench / "test.jsonl").read_text()


def test_splits_tasks_and_card(bench):
    for split, n in SIZES.items():
        rows = records(bench, split)
        assert len(rows) == n * len(TASKS)
        assert {r["family"] for r in rows} == {"hard", "reasoning", "easy"}
        assert all((bench / r["image"]).is_file() and r["answer"] for r in rows)
    card = json.loads((bench / "card.json").read_text())
    assert card["seed"] == 3 and set(card["tasks"]) == set(TASKS)
    assert "marked_digit" in (bench / "README.md").read_text()


def by_task(bench, task):
    return [r for r in records(bench) if r["task"] == task]


def test_colour_and_quadrant_read_from_pixels(bench):
    for r in by_task(bench, "dominant_colour"):
        px = pixels(bench, r).reshape(-1, 3)
        colours, counts = np.unique(px, axis=0, return_counts=True)
        assert tuple(colours[counts.argmax()]) == COLOURS[r["answer"]]
    for r in by_task(bench, "quadrant"):
        ys, xs = np.nonzero((pixels(bench, r) != 255).any(-1))
        half = 64
        assert QUADRANTS[int(ys.mean() >= half) * 2 + int(xs.mean() >= half)] == r["answer"]


def test_shape_count_and_chart_or_table_read_from_pixels(bench):
    for r in by_task(bench, "count_shapes"):
        ink = (pixels(bench, r) != 255).any(-1)
        centres = [ink[row * 42 + 21, col * 42 + 21] for row in range(3) for col in range(3)]
        assert sum(centres) == int(r["answer"])
    for r in by_task(bench, "chart_or_table"):
        has_bars = (np.abs(pixels(bench, r) - COLOURS["blue"]).sum(-1) == 0).sum() > 50
        assert ("chart" if has_bars else "table") == r["answer"]


def test_digit_answers_follow_the_handwriting_labels(bench):
    targets = digits()[1]
    for r in by_task(bench, "marked_digit"):
        red = np.abs(pixels(bench, r) - COLOURS["red"]).sum(-1) == 0
        ys, xs = np.nonzero(red)
        cell = 128 // len(r["meta"]["labels"])
        row, col = int(ys.mean() // cell), int(xs.mean() // cell)  # the box's centre -> its cell
        assert str(targets[r["meta"]["indices"][row][col]]) == r["answer"]
    for r in by_task(bench, "left_of_mark"):  # the digit one cell left of the red box's
        red = np.abs(pixels(bench, r) - COLOURS["red"]).sum(-1) == 0
        ys, xs = np.nonzero(red)
        cell = 128 // len(r["meta"]["labels"])
        row, col = int(ys.mean() // cell), int(xs.mean() // cell)
        assert col > 0 and r["family"] == "reasoning"
        assert str(targets[r["meta"]["indices"][row][col - 1]]) == r["answer"]
    for r in by_task(bench, "grid_digit"):
        row, col = map(int, re.findall(r"\d+", r["question"]))
        assert str(targets[r["meta"]["indices"][row - 1][col - 1]]) == r["answer"]


def test_text_answers_follow_their_rendering_parameters(bench):
    for r in by_task(bench, "table_value") + by_task(bench, "bar_value"):
        names = r["meta"].get("rows") or r["meta"]["names"]
        name = re.search(r"(?:labelled|the) (\w+)(?:\?| bar)", r["question"]).group(1)
        assert str(r["meta"]["values"][names.index(name)]) == r["answer"]
    ordinals = ["first", "second", "third", "fourth"]
    for r in by_task(bench, "word_at"):
        word, line = re.search(r"the (\w+) word of line (\d+)", r["question"]).groups()
        assert r["meta"]["lines"][int(line) - 1][ordinals.index(word)] == r["answer"]


@pytest.mark.parametrize("size, cells", [(64, 4), (96, 6), (128, 8), (384, 8)])
def test_red_box_grids_have_16_pixel_cells_on_small_images(tmp_path, size, cells):
    from visor.synth import make_item, marked_grid

    assert marked_grid(size) == cells
    targets = digits()[1]
    for i in range(4):
        item = make_item("left_of_mark", 0, "test", i, size)
        labels, indices = item.meta["labels"], item.meta["indices"]
        assert len(labels) == cells and all(len(row) == cells for row in labels)
        red = np.abs(np.asarray(item.image.convert("RGB")).astype(int) - COLOURS["red"]).sum(-1) == 0
        ys, xs = np.nonzero(red)
        row, col = int(ys.mean() // (size // cells)), int(xs.mean() // (size // cells))
        assert (row, col) == (item.meta["row"], item.meta["col"]) and col >= 1
        assert item.answer == str(labels[row][col - 1]) == str(targets[indices[row][col - 1]])
