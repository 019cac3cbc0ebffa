"""`visor demo`: the paper's story end to end on a laptop CPU, with real (tiny) models and data.

Stages, each cached under OUT/stages/<name>-<hash of its config and inputs> (``--fresh`` redoes):

1. data      the built-in benchmark, demo-sized (128-pixel images; tasks a tiny model can learn)
2. vision    a tiny LLaVA-OneVision (SigLIP + Qwen2 classes), its vision tower pre-trained briefly
             to tell each patch's digit, red mark and place in its crop, then kept fixed (a cheap
             head start standing in for a real tower's pre-training)
3. base      trained as an ordinary LVLM (every layer full self-attention): "the pretrained base"
4. stage1    converted to VISOR; CA modules only
5. stage2    universal training, one sampled budget per step
6. policy    the per-sample budget router
7. compare   base, VISOR budgets and auto, FastV / PyramidDrop / VisionZip over their knobs, and
             VISOR + VisionZip, on the test split

It ends with OUT/report.md, OUT/pareto.png and OUT/results.json, and prints the main table.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from .evaluate import accuracy_cell
from .outputs import atomic_write, claim

console = Console()
DEMO_ENTRIES = ("stages", "report.md", "results.json", "pareto.png")


@dataclass
class DemoConfig:
    seed: int = 0
    image_size: int = 128  # benchmark images: 16-pixel cells of the 8 x 8 digit grid
    tower_size: int = 64  # vision tower input; AnyRes: the whole image + 2 x 2 full-resolution tiles
    # with patch 16: one grid cell per tile patch; 16 tokens per crop, 88 per image (with newlines)
    hard_tasks: list[str] = field(default_factory=lambda: ["marked_digit"])
    easy_tasks: list[str] = field(default_factory=lambda: ["dominant_colour", "quadrant"])
    train_per_task: int = 4000
    easy_train_per_task: int = 800  # fewer easy samples: most steps go to the hard task
    val_per_task: int = 40
    test_per_task: int = 100
    layers: int = 6
    hidden: int = 128
    intermediate: int = 512
    vision_hidden: int = 128
    vision_layers: int = 4
    patch_size: int = 16
    vision_steps: int = 400
    freeze_vision: bool = True  # after its pre-training the tower stays fixed (base and VISOR alike)
    base_steps: int = 800
    stage1_steps: int = 150
    stage2_steps: int = 900
    batch_size: int = 32
    policy_epochs: int = 300

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(
            train_per_task=60,
            easy_train_per_task=30,
            val_per_task=6,
            test_per_task=8,
            vision_steps=5,
            base_steps=12,
            stage1_steps=4,
            stage2_steps=6,
            batch_size=8,
            policy_epochs=20,
        )


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


class Stages:
    """Runs each stage once per configuration; a finished stage has a DONE file."""

    def __init__(self, out: Path, fresh: bool):
        self.root = out / "stages"
        if fresh:  # `out` is the demo's own (claimed by run_demo): its stages are ours to redo
            shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}

    def run(self, name: str, key: str, fn) -> Path:
        path = self.root / f"{name}-{key}"
        if (path / "DONE").exists():
            console.print(f"[dim]{name}: cached ({path})[/]")
        else:
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            began = time.perf_counter()
            summary = fn(path) or {}
            summary["seconds"] = round(time.perf_counter() - began, 1)
            atomic_write(path / "DONE", json.dumps(summary, default=str) + "\n")
            console.print(f"[bold]{name}[/]: {summary}")
        self.timings[name] = json.loads((path / "DONE").read_text())["seconds"]  # as computed, even if cached
        return path


def pretrain_vision(model, data_dir: Path, steps: int, batch_size: int, seed: int) -> dict:
    """A linear head on the tower's patch features learns, on the digit-grid images of the
    training split, each patch's place in its crop (every crop: in the whole-image view that is
    where in the image the patch lies, as a real tower's features tell), and each patch's digit
    and whether its cell carries the red mark where a patch lies within one grid cell (AnyRes
    tiles at full resolution; the downscaled base view too when its cells are patch-sized)."""
    from torch import nn

    from .backbone import load_image

    rows = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "labels" in r["meta"]]
    if not rows or steps == 0:
        return {"steps": 0}
    cells = max(len(r["meta"]["labels"]) for r in rows)  # one grid size: the finest
    rows = [r for r in rows if len(r["meta"]["labels"]) == cells]
    bb = model.backbone
    tower = bb.hf.model.vision_tower
    side = bb.config.vision_config.image_size // bb.config.vision_config.patch_size
    head = nn.Linear(bb.config.vision_config.hidden_size, 10 + 2 + side * side)
    optimizer = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses, accuracy, placed = [], [], []
    for _ in range(steps):
        batch = [rows[i] for i in torch.randint(len(rows), (batch_size,), generator=gen).tolist()]
        pixels = bb.image_processor([[load_image(data_dir / r["image"])] for r in batch], return_tensors="pt")
        pixels = pixels["pixel_values"]  # (B, crops, 3, H, W): the whole image, then the tiles row by row
        grid = math.isqrt(pixels.shape[1] - 1)
        crops = [(0, 1, 0, 0)] + [(k, grid, (k - 1) // grid, (k - 1) % grid) for k in range(1, pixels.shape[1])]
        feats, targets = [], []
        for k, g, a, b in crops:
            feats.append(tower(pixels[:, k], output_hidden_states=True).hidden_states[-1])  # (B, side*side, hidden)
            readable = cells <= g * side  # else a patch straddles cells: no digit target (-100 = ignored)
            for r in batch:
                for i in range(side):
                    for j in range(side):
                        rr, cc = int((a + (i + 0.5) / side) / g * cells), int((b + (j + 0.5) / side) / g * cells)
                        marked = r["task"] == "marked_digit" and (rr, cc) == (r["meta"]["row"], r["meta"]["col"])
                        digit = [r["meta"]["labels"][rr][cc], int(marked)] if readable else [-100, -100]
                        targets.append([*digit, i * side + j])
        logits = head(torch.stack(feats, 1).reshape(-1, head.in_features))  # (image, crop, patch) order
        t = torch.tensor(targets).view(len(feats), len(batch), side * side, 3).transpose(0, 1).reshape(-1, 3)
        ce = nn.functional.cross_entropy
        loss = ce(logits[:, :10], t[:, 0]) + ce(logits[:, 10:12], t[:, 1]) + ce(logits[:, 12:], t[:, 2])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        readable = t[:, 0] >= 0
        accuracy.append((logits[readable, :10].argmax(-1) == t[readable, 0]).float().mean().item())
        placed.append((logits[:, 12:].argmax(-1) == t[:, 2]).float().mean().item())
    return {
        "steps": steps,
        "first_loss": round(losses[0], 3),
        "last_loss": round(sum(losses[-20:]) / len(losses[-20:]), 3),
        "patch_digit_accuracy": round(sum(accuracy[-20:]) / len(accuracy[-20:]), 3),
        "patch_place_accuracy": round(sum(placed[-20:]) / len(placed[-20:]), 3),
    }


def run_demo(out: str | Path = "runs/demo", quick: bool = False, fresh: bool = False) -> dict:
    from . import __version__
    from .api import load
    from .evaluate import Setting, compare
    from .policy import PolicyTrainConfig, train_policy
    from .reduce import Reduction
    from .synth import make_dataset
    from .tiny import TinySpec, build_tiny
    from .train import TrainConfig, train

    torch.manual_seed(0)
    cfg = DemoConfig.quick() if quick else DemoConfig()
    out = claim(out, "demo", DEMO_ENTRIES, resume=True)  # a demo of ours is continued: its stages are a cache
    stages = Stages(out, fresh)
    tasks = cfg.hard_tasks + cfg.easy_tasks
    sizes = {"train": cfg.train_per_task, "val": cfg.val_per_task, "test": cfg.test_per_task}

    def make_data(path):
        card = make_dataset(path, cfg.seed, sizes, tasks, cfg.image_size, progress=True)
        rows = (path / "train.jsonl").read_text().splitlines()
        seen: dict[str, int] = {}
        kept = []
        for line in rows:  # fewer training samples of the easy tasks
            task = json.loads(line)["task"]
            seen[task] = seen.get(task, 0) + 1
            if task not in cfg.easy_tasks or seen[task] <= cfg.easy_train_per_task:
                kept.append(line)
        atomic_write(path / "train.jsonl", "\n".join(kept) + "\n")
        return card | {"train_records": len(kept)}

    key = _digest("data", cfg.seed, cfg.image_size, tasks, sizes, cfg.easy_train_per_task)
    data = stages.run("data", key, make_data)

    spec = TinySpec(
        layers=cfg.layers,
        hidden=cfg.hidden,
        intermediate=cfg.intermediate,
        vision_hidden=cfg.vision_hidden,
        vision_layers=cfg.vision_layers,
        vision_heads=4,
        vision_intermediate=4 * cfg.vision_hidden,
        image_size=cfg.tower_size,
        patch_size=cfg.patch_size,
        seed=cfg.seed,
    )

    def vision(path):
        build_tiny(path / "random", spec)
        model = load(path / "random")
        summary = pretrain_vision(model, data, cfg.vision_steps, cfg.batch_size, cfg.seed)
        model.save(path / "model")
        return summary

    key = _digest("vision", asdict(spec), cfg.vision_steps, cfg.batch_size, "digits, marks, places", key)
    vision_dir = stages.run("vision", key, vision)

    def trainer(name, model_dir, **kw):
        def fn(path):
            final = train(
                TrainConfig(
                    model=str(model_dir),
                    data=str(data / "train.jsonl"),
                    out=str(path),
                    batch_size=cfg.batch_size,
                    seed=cfg.seed,
                    **kw,
                )
            )
            rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
            return {"final": str(final), "last_loss": round(sum(r["loss"] for r in rows[-10:]) / len(rows[-10:]), 4)}

        return fn

    frozen = dict(freeze_vision=cfg.freeze_vision)
    base_kw = dict(stage=2, budgets="full", steps=cfg.base_steps, lr=2e-3, warmup_steps=30, **frozen)
    key = _digest("base", base_kw, key)
    base = stages.run("base", key, trainer("base", vision_dir / "model", **base_kw)) / "final"
    s1_kw = dict(stage=1, budgets="all", steps=cfg.stage1_steps, lr=3e-3, warmup_steps=10)
    key = _digest("stage1", s1_kw, key)
    s1 = stages.run("stage1", key, trainer("stage1", base, **s1_kw)) / "final"
    s2_kw = dict(stage=2, budgets="all", steps=cfg.stage2_steps, lr=1e-3, warmup_steps=10, **frozen)
    key = _digest("stage2", s2_kw, key)
    s2 = stages.run("stage2", key, trainer("stage2", s1, **s2_kw)) / "final"
    key = _digest("policy", cfg.policy_epochs, key)
    policy = (
        stages.run(
            "policy",
            key,
            lambda p: {
                k: v
                for k, v in train_policy(
                    s2, data / "val.jsonl", data, p, PolicyTrainConfig(epochs=cfg.policy_epochs), batch_size=16
                ).items()
                if k in ("labels", "final")
            },
        )
        / "final"
    )

    model = load(policy)
    n = len(model.schedule.sa_candidates)
    per_crop = (cfg.tower_size // cfg.patch_size) ** 2
    settings = [Setting("base")] + [Setting("visor", b) for b in model.schedule.sa_budgets] + [Setting("visor", "auto")]
    settings += [Setting("fastv", "full", Reduction("fastv", layer=1, keep=r)) for r in (0.25, 0.1, 0.05, 0.02)]
    settings += [Setting("fastv", "full", Reduction("fastv", layer=2, keep=0.1))]
    settings += [Setting("pdrop", "full", Reduction("pdrop", stages=[1, 2, 4], ratio=r)) for r in (0.5, 0.25, 0.1)]
    settings += [
        Setting("visionzip", "full", Reduction("visionzip", dominant=d, contextual=1))
        for d in sorted({max(1, per_crop * f // 16) for f in (1, 2, 3, 5)})
    ]
    settings.append(Setting("visor+visionzip", n, Reduction("visionzip", dominant=max(1, per_crop // 4), contextual=1)))
    key = _digest("compare", [s.label for s in settings], "base and baselines on the base weights", key)
    compared = stages.run(
        "compare",
        key,
        lambda p: {
            "settings": len(
                compare(
                    model,
                    data / "test.jsonl",
                    p,
                    settings=settings,
                    batch_size=16,
                    max_new_tokens=12,
                    base_model=load(base),
                )["results"]
            )
        },
    )
    results = json.loads((compared / "results.json").read_text())["results"]
    elapsed = sum(stages.timings.values())  # the pipeline's compute time, cached stages included
    return write_report(out, results, cfg, quick, stages.timings, elapsed, __version__, compared)


def _acc(r, family):
    f = r["summary"]["family"].get(family)
    return None if f is None else 100 * f["accuracy"]


def check_targets(results: list[dict]) -> list[tuple[str, bool, str]]:
    """The demo's targets, each (statement, met, numbers)."""
    base = next(r for r in results if r["method"] == "base")
    hard, easy = _acc(base, "hard"), _acc(base, "easy")
    checks = [
        ("base model >= 85% hard and >= 90% easy", hard >= 85 and easy >= 90, f"hard {hard:.1f}, easy {easy:.1f}")
    ]
    cheap = [r for r in results if r["method"] == "visor" and r["budget"] != "auto" and r["relative_lm_flops"] <= 1 / 3]
    if not cheap:
        checks.append(("a VISOR budget at <= 1/3 of the base LM prefill FLOPs", False, "none that cheap"))
        return checks
    best = max(cheap, key=lambda r: r["relative_lm_flops"])  # the largest budget within 1/3 of the FLOPs
    gap_h, gap_e = hard - _acc(best, "hard"), easy - _acc(best, "easy")
    checks.append(
        (
            f"VISOR budget {best['budget']} ({best['relative_lm_flops']:.2f}x FLOPs) within 2 points of the base",
            gap_h <= 2 and gap_e <= 2,
            f"vs. base: hard {-gap_h:+.1f}, easy {-gap_e:+.1f}",
        )
    )
    for method in ("fastv", "pdrop", "visionzip"):
        near = [
            r
            for r in results
            if r["method"] == method and abs(r["relative_lm_flops"] / best["relative_lm_flops"] - 1) <= 0.10
        ]
        if not near:
            checks.append(
                (
                    f"{method} at the same FLOPs (±10%) >= 10 points below VISOR on hard",
                    False,
                    "no setting within ±10% FLOPs",
                )
            )
            continue
        top = max(near, key=lambda r: _acc(r, "hard"))
        gap = _acc(best, "hard") - _acc(top, "hard")
        checks.append(
            (
                f"{method} at the same FLOPs (±10%) >= 10 points below VISOR on hard",
                gap >= 10,
                f"{top['setting']}: hard {_acc(top, 'hard'):.1f} ({gap:.1f} points behind)",
            )
        )
    auto = next((r for r in results if r["budget"] == "auto"), None)
    fixed = sorted(
        (r["relative_lm_flops"], r["summary"]["overall"]["accuracy"])
        for r in results
        if r["method"] == "visor" and r["budget"] != "auto"
    )
    if auto is not None and len(fixed) > 1:
        x, y = auto["relative_lm_flops"], auto["summary"]["overall"]["accuracy"]
        lo = max((p for p in fixed if p[0] <= x), default=fixed[0])
        hi = min((p for p in fixed if p[0] >= x), default=fixed[-1])
        line = lo[1] if hi[0] == lo[0] else lo[1] + (hi[1] - lo[1]) * (x - lo[0]) / (hi[0] - lo[0])
        checks.append(
            (
                "auto on or above the line through the fixed budgets",
                y >= line - 1e-9,
                f"auto {100 * y:.2f}% at {x:.3f}x vs. line {100 * line:.2f}%",
            )
        )
    return checks


def write_report(out: Path, results, cfg, quick, timings, elapsed, version, compared) -> dict:
    import transformers

    atomic_write(out / "pareto.png", (compared / "pareto.png").read_bytes())
    checks = check_targets(results)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    checks.append(
        (
            "total wall-clock <= 15 min and peak RAM <= 4 GB",
            elapsed <= 900 and peak_mb <= 4096,
            f"{elapsed / 60:.1f} min of stages; {peak_mb:.0f} MB peak in this invocation",
        )
    )
    lines = [
        "# visor demo: VISOR vs. token reduction on a tiny LLaVA-OneVision, 2-core CPU",
        "",
        "| method | hard % (95% CI) | easy % (95% CI) | LM prefill FLOPs vs. base | CPU prefill ms / sample |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        n, family = r["summary"]["overall"]["n"], r["summary"]["family"]
        lines.append(
            f"| {r['setting']} | {accuracy_cell(family.get('hard'))} | {accuracy_cell(family.get('easy'))} | "
            f"{r['relative_lm_flops']:.3f} | {1000 * r['prefill_seconds'] / n:.2f} |"
        )
    lines += [
        "",
        "The baselines run on the base model's weights (they need no training); VISOR's weights had "
        "stage 1 and stage 2 on top, so at this scale part of VISOR's lead is extra training.",
        "",
        "## Targets",
        "",
        "| target | met | numbers |",
        "|---|---|---|",
    ]
    lines += [f"| {t} | {'yes' if ok else '**no**'} | {nums} |" for t, ok, nums in checks]
    lines += [
        "",
        "![accuracy vs. FLOPs](pareto.png)",
        "",
        "## Reproduce",
        "",
        f"`visor demo{' --quick' if quick else ''}` — {elapsed / 60:.1f} min in all "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}).",
        "",
        f"visor {version}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}, {torch.get_num_threads()} threads.",
        "",
        "```json",
        json.dumps(asdict(cfg), indent=2),
        "```",
    ]
    report = "\n".join(lines) + "\n"
    atomic_write(out / "report.md", report)
    summary = {
        "config": asdict(cfg),
        "quick": quick,
        "elapsed_s": elapsed,
        "timings_s": timings,
        "targets": [{"target": t, "met": ok, "numbers": nums} for t, ok, nums in checks],
        "results": [{k: v for k, v in r.items() if k != "rows"} for r in results],
    }
    atomic_write(out / "results.json", json.dumps(summary, indent=2, default=str) + "\n")
    return summary
