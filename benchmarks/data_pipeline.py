"""The training data pipeline at scale (a benchmark, not a test): index 1,000,000 records (JSONL, and
the same as an LLaVA JSON list), start a run on them, and check that 2 DataLoader workers keep the
steps from waiting for data.

    python benchmarks/data_pipeline.py                       # 1,000,000 records, tiny model, batch 32
    python benchmarks/data_pipeline.py --records 100000 --out /tmp/dp

Prints (and writes OUT/data_pipeline.json): index time and peak RSS (in a fresh process, per format), the
training start-up (process start to the first step done), and per-step time with 0 and 2 workers
beside the time the loader alone needs per micro-batch.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

QUESTIONS = ["Which colour fills the picture?", "What is the colour of this image?", "Name the colour."]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def make_data(out: Path, n_records: int, n_images: int = 300) -> Path:
    (out / "img").mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    names = []
    for i in range(n_images):
        name = sorted(COLOURS)[i % len(COLOURS)]
        noise = np.random.default_rng(i).integers(0, 40, (48, 48, 3))
        pixels = np.clip(np.array(COLOURS[name]) + noise - 20, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(out / "img" / f"{i}.png")
        names.append(name)
    path = out / "train.jsonl"
    with open(path, "w") as f, open(out / "train.json", "w") as llava:
        llava.write("[\n")
        for n in range(n_records):
            i, question = rng.randrange(n_images), rng.choice(QUESTIONS)
            f.write(json.dumps({"image": f"{i}.png", "question": question, "answer": names[i]}) + "\n")
            turns = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": names[i]}]
            llava.write(("," if n else "") + json.dumps({"image": f"{i}.png", "conversations": turns}) + "\n")
        llava.write("]\n")
    return path


def index_in_fresh_process(path: Path) -> dict:
    code = (
        "import resource, sys, time; t = time.perf_counter(); from visor.data import RecordIndex; "
        f"index = RecordIndex({str(path)!r}); took = time.perf_counter() - t; "
        "print(len(index), took, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    n, took, rss = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    return {"records": int(n), "index_s": float(took), "peak_rss_mb": float(rss)}


def train_run(model: Path, data: Path, out: Path, steps: int, workers: int) -> dict:
    cmd = [sys.executable, "-m", "visor.cli", "train", "--model", str(model), "--data", str(data), "--out", str(out)]
    cmd += ["--images", str(data.parent / "img")]
    cmd += ["--stage", "1", "--steps", str(steps), "--batch-size", "32", "--workers", str(workers), "--overwrite"]
    began = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - began
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = metrics[0]["elapsed_s"]  # the first step, from the loop's start
    per_step = (metrics[-1]["elapsed_s"] - first) / max(1, len(metrics) - 1)
    return {"wall_s": wall, "first_step_s": first, "step_s": per_step, "steps": len(metrics)}


def loader_alone(model: Path, data: Path, steps: int, workers: int) -> float:
    """Seconds per micro-batch the loader needs by itself (no training)."""
    import visor
    from visor.data import RecordIndex, TrainSet
    from visor.train import TrainConfig, loader

    backbone = visor.load(model, device="cpu").backbone
    dataset = TrainSet(RecordIndex(data), data.parent / "img", backbone)
    cfg = TrainConfig(model=str(model), data=str(data), batch_size=32, workers=workers)
    batches = iter(loader(dataset, cfg, 0, steps + 1, 1, 0))
    next(batches)  # workers started
    began = time.perf_counter()
    for _ in range(steps):
        next(batches)
    return (time.perf_counter() - began) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=Path("/tmp/visor-data-pipeline"))
    args = parser.parse_args()
    from visor.tiny import TinySpec, build_tiny

    args.out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    data = make_data(args.out, args.records)
    print(f"wrote {args.records:,} records in {time.perf_counter() - t:.1f} s")
    model = build_tiny(args.out / "tiny", TinySpec(), overwrite=True)
    result = {
        "index": index_in_fresh_process(data),
        "index_llava_json": index_in_fresh_process(data.with_suffix(".json")),
    }
    print(f"index: JSONL {result['index']}, LLaVA JSON {result['index_llava_json']}")
    result["start_up"] = train_run(model, data, args.out / "run1", steps=1, workers=2)
    print(f"start-up (process start to the end of a 1-step run): {result['start_up']['wall_s']:.1f} s")
    for workers in (0, 2):
        run = train_run(model, data, args.out / f"run_w{workers}", steps=12, workers=workers)
        run["loader_s_per_batch"] = loader_alone(model, data, 12, workers)
        result[f"workers_{workers}"] = run
        print(f"workers {workers}: step {run['step_s']:.3f} s, loader alone {run['loader_s_per_batch']:.3f} s/batch")
    (args.out / "data_pipeline.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
