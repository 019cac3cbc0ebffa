"""Where are the previous-token heads the demo's reasoning task needs? (a measurement, not a test)

The reasoning question (the digit left of the red box) is answered through the marked cell's token
reading the token before it (its left neighbour in the AnyRes raster). For each demo run given, this
prints, per language-model layer, the attention a visual token pays to the one just before it
(head-averaged, over the first reasoning test samples), after the LM warm-up and after the base's
training: where the warm-up left such heads, and whether the base built on them.

    python benchmarks/previous_token_heads.py runs/demo runs/demo-seed1 \
        --out benchmarks/results/previous_token_heads.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from visor.demo import previous_token_attention


def main() -> None:
    import visor

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="demo output directories (their stages/)")
    parser.add_argument("--samples", type=int, default=16, help="reasoning test samples per run")
    parser.add_argument("--out", type=Path, help="where to write the numbers as JSON")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = {}
    for run in args.runs:
        data = next((run / "stages").glob("data-*"))
        lines = (data / "test.jsonl").read_text().splitlines()
        records = [r for r in map(json.loads, lines) if r["task"] == "left_of_mark"][: args.samples]
        report = run / "results.json"  # a finished demo: its seed names it
        seed = json.loads(report.read_text())["config"]["seed"] if report.is_file() else None
        results[run.name if seed is None else f"seed {seed}"] = row = {}
        for stage, sub in (("lm_warmup", "model"), ("base", "final")):
            model = visor.load(next((run / "stages").glob(f"{stage}-*")) / sub, attn_implementation="eager")
            row[stage] = previous_token_attention(model, records, data)
            print(f"{run} (seed {seed}) after {stage}: {row[stage]}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
