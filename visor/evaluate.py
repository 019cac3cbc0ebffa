"""One evaluation harness for VISOR and the token-reduction baselines, and the sweep comparing them.

``evaluate``: batched generation over a JSONL/LLaVA-JSON set; per sample exact match against any
reference answer (after normalisation: lower case, punctuation removed, spaces collapsed) and ANLS
as DocVQA defines it (``anls``); FLOPs (prefill and total, from ``visor.flops``); wall-clock.
Summaries per task, per family (hard / reasoning / easy, or the data's own) and overall, each
accuracy with its 95% Wilson interval.

``compare``: VISOR at every budget (and ``auto`` with a policy), the base model, FastV, PyramidDrop
and VisionZip over their knobs, and VISOR + VisionZip; writes ``results.json``, ``report.md``
(every setting, and a table matching each VISOR budget to each baseline's setting with the
nearest FLOPs) and ``pareto.png`` (accuracy vs. relative LM prefill FLOPs, a panel per task family).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import checks
from .backbone import TOWERED, load_image, passes
from .data import read_records
from .errors import ConfigError
from .outputs import atomic_write, claim
from .policy import normalise
from .reduce import Reduction, reduces, visionzip_of

METHODS = ("visor", "base", "fastv", "pdrop", "visionzip")


def anls(prediction: str, references: str | list[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity, one sample, as DocVQA defines it: prediction and
    each reference lower-cased with whitespace collapsed; NL = edit distance / the longer length;
    1 - NL where NL < ``threshold``, else 0; the best over the references."""
    from rapidfuzz.distance import Levenshtein

    def clean(text: str) -> str:
        return " ".join(text.strip().lower().split())

    refs = [references] if isinstance(references, str) else references
    distances = [Levenshtein.normalized_distance(clean(prediction), clean(ref)) for ref in refs]
    return max((1 - d if d < threshold else 0.0) for d in distances)


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% at z = 1.96)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low, high = (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)
    return (max(0.0, min(p, low)), min(1.0, max(p, high)))  # holds p also where rounding would not (p = 0, 1)


@dataclass
class Setting:
    """One method at one operating point."""

    method: str = "visor"
    budget: object = "full"
    reduction: Reduction | None = None

    @property
    def label(self) -> str:
        if self.method == "base":
            return "base"
        parts = [f"visor:{self.budget}"] if self.budget != "full" else []
        if self.reduction is not None and self.reduction.method != "none":
            parts.append(self.reduction.label())
        return " + ".join(parts) or "base"

    def for_model(self, model) -> Setting:
        """This setting with its budget made concrete for ``model`` (the base: "full"; see
        ``VisorModel.parse_budget`` for a budget left open)."""
        budget = "full" if self.method == "base" else model.parse_budget(self.budget, self.reduction)
        return replace(self, budget=budget)


def make_setting(method: str, budget=None, layer=2, keep=0.5, stages="", ratio=0.5, dominant=54, contextual=10):
    """A Setting from a user's options (CLI flags, lmms-eval model_args); ``stages``: "6,12,18"."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    reduction = None
    if method in ("fastv", "pdrop", "visionzip"):
        stage_list = checks.int_list("--stages", str(stages)) if stages else []
        knobs = int(layer), float(keep), stage_list, float(ratio), int(dominant), int(contextual)
        reduction = Reduction(method, *knobs)
    return Setting(method, budget, reduction)


def summarise(rows: list[dict]) -> dict:
    def agg(rs):
        return {
            "n": len(rs),
            "accuracy": statistics.fmean(r["correct"] for r in rs),
            "accuracy_ci": wilson(sum(r["correct"] for r in rs), len(rs)),
            "anls": statistics.fmean(r["anls"] for r in rs),
            "prefill_flops": statistics.fmean(r["prefill_flops"] for r in rs),
            "lm_prefill_flops": statistics.fmean(r["lm_prefill_flops"] for r in rs),
            "total_flops": statistics.fmean(r["total_flops"] for r in rs),
        }

    out = {"overall": agg(rows), "family": {}, "task": {}}
    for key in ("family", "task"):
        for name in sorted({r[key] for r in rows if r[key]}):
            out[key][name] = agg([r for r in rows if r[key] == name])
    return out


def check_options(batch_size: int, max_new_tokens: int, limit: int | None) -> None:
    checks.count("batch_size", batch_size, 1)
    checks.count("max_new_tokens", max_new_tokens, 1)
    if limit is not None:
        checks.count("limit", limit, 1)


def evaluate(
    model,
    data,
    images=None,
    setting: Setting | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    limit: int | None = None,
    progress: bool = True,
    prefill: str = "auto",
    decode: str = "auto",
    encoded: dict | None = None,
    towers: dict | None = None,
) -> dict:
    """Accuracy, ANLS, FLOPs and time of one setting on a data set (``prefill``/``decode``: the modes
    of ``VisorModel.generate``). ``encoded``: a dict the caller keeps across settings of this model,
    where each record's encoded prompt is kept (per VisionZip setting) and met again, not re-encoded —
    for small sets: every kept prompt's visual tokens stay on the model's device. ``towers``: a dict
    kept across models too, where each record's vision-tower output is kept under what it follows from
    (``Backbone.tower_digest``, VisionZip or not): models with the same fixed tower, fine-tuned from one
    base with it frozen, run it once (LLaVA, LLaVA-OneVision; ignored for the other families)."""
    from tqdm.auto import tqdm

    setting = setting or Setting()
    check_options(batch_size, max_new_tokens, limit)
    if setting.reduction is not None:
        setting.reduction.check(model.config)  # one not defined for this family: refused before any work
    records, skipped = read_records(data, images or Path(data).parent)
    records = records[:limit] if limit else records
    runner = model.runner(prefill, decode)
    rows, prefill_seconds, began = [], 0.0, time.perf_counter()
    budget = "full" if setting.method == "base" else setting.budget
    tower = None  # this model's kept tower outputs (VisionZip's, for a VisionZip setting), where shared
    if towers is not None and model.config.model_type in TOWERED:
        zipped = reduces(model.config, visionzip_of(setting.reduction))  # VisionZip's tower part: whatever the knob
        tower = towers.setdefault(model.backbone.tower_digest(zipped), {})
    for start in tqdm(range(0, len(records), batch_size), desc=setting.label, disable=not progress, leave=False):
        chunk = records[start : start + batch_size]
        samples = _encoded(model, chunk, setting.reduction, {} if encoded is None else encoded, tower)
        outs = model.generate_encoded(
            samples, budget, max_new_tokens, reduction=setting.reduction, prefill=prefill, decode=decode
        )
        prefill_seconds += outs[0].prefill_seconds
        for r, g in zip(chunk, outs):
            rows.append(
                {
                    "source": r.source,
                    "task": r.task,
                    "family": r.family,
                    "question": r.question,
                    "answer": r.answer,
                    "prediction": g.text,
                    "budget": g.budget,
                    "correct": float(any(normalise(g.text) == normalise(a) for a in r.answers)),
                    "anls": anls(g.text, r.answers),
                    "prefill_flops": g.flops["prefill"],
                    "lm_prefill_flops": g.flops["lm_prefill"],
                    "total_flops": g.flops["total"],
                }
            )
    seconds = time.perf_counter() - began
    return {
        "setting": setting.label,
        "method": setting.method,
        "budget": budget,
        "reduction": setting.reduction.__dict__ if setting.reduction else None,
        "summary": summarise(rows),
        "seconds": seconds,
        **model.placement,
        "modes": {"prefill": runner.prefill_mode, "decode": runner.decode_mode},  # what "auto" became
        "prefill_seconds": prefill_seconds,
        "n_skipped": len(skipped),
        "skipped": skipped,  # why each unusable record was left out
        "rows": rows,
    }


def _encoded(model, records, reduction, kept: dict, tower: dict | None = None) -> list:
    """The records' encoded prompts, from ``kept`` where there, else encoded now and kept (``tower``: the
    model's tower outputs, kept by image paths: where there the tower does not run, else kept too)."""
    zip_ = visionzip_of(reduction)
    key = lambda r: (r.question, tuple(r.images), zip_)  # noqa: E731 - what the encoding follows from
    missing = [r for r in records if key(r) not in kept]
    if missing:
        towered = None
        if tower is not None:
            new = list({tuple(r.images): r.images for r in missing if tuple(r.images) not in tower}.values())
            scored = reduces(model.config, zip_)  # VisionZip reads its scores and keys
            for members in passes(new):  # as many images a pass as encoding takes
                loaded = [[load_image(p) for p in new[i]] for i in members]
                with torch.no_grad():
                    tower.update(zip((tuple(new[i]) for i in members), model.backbone.tower_batch(loaded, scored)))
            towered = [tower[tuple(r.images)] for r in missing]
        samples = model.encode([r.question for r in missing], [r.images for r in missing], reduction, towered)
        kept.update({key(r): s for r, s in zip(missing, samples)})
    return [kept[key(r)] for r in records]


def markdown(result: dict) -> str:
    lines = [
        f"### {result['setting']}",
        "",
        "| group | n | accuracy (95% CI) | ANLS | prefill GFLOPs | LM prefill GFLOPs |",
        "|---|---|---|---|---|---|",
    ]
    s = result["summary"]
    groups = [("all", s["overall"])] + [(f"family {k}", v) for k, v in s["family"].items()]
    groups += [(f"task {k}", v) for k, v in s["task"].items()]
    for name, g in groups:
        lines.append(
            f"| {name} | {g['n']} | {g['accuracy']:.3f} ({g['accuracy_ci'][0]:.3f}-{g['accuracy_ci'][1]:.3f}) | "
            f"{g['anls']:.3f} | "
            f"{g['prefill_flops'] / 1e9:.3f} | {g['lm_prefill_flops'] / 1e9:.3f} |"
        )
    modes = result["modes"]
    lines.append(
        f"\n{result['seconds']:.1f} s in all, prefill {result['prefill_seconds']:.1f} s "
        f"({result['device']}, {result['dtype']}, {modes['prefill']} prefill, {modes['decode']} decode)."
    )
    if result["n_skipped"]:
        lines.append(f"\n{skipped_note(result)}")
    return "\n".join(lines) + "\n"


def skipped_note(result: dict) -> str:
    first = result["skipped"][0] if result.get("skipped") else ""
    return f"{result['n_skipped']} unusable record(s) left out (first: {first})."


RESULT_ENTRIES = ("result.json", "result.md")
COMPARE_ENTRIES = ("results.json", "report.md", "pareto.png")


def write_result(out, result: dict, inputs=(), overwrite: bool = False) -> Path:
    """OUT/result.json and OUT/result.md, each replaced atomically (OUT: see visor.outputs)."""
    out = claim(out, "eval", RESULT_ENTRIES, inputs, overwrite)
    atomic_write(out / "result.json", json.dumps(result, indent=2, default=str) + "\n")
    atomic_write(out / "result.md", markdown(result))
    return out


# ---- the sweep ------------------------------------------------------------------------------------


def default_settings(model) -> list[Setting]:
    """The base, every VISOR budget (and `auto`), and the baselines the model's family defines: FastV
    (after layer 2, or after the last DeepStack layer), PyramidDrop, VisionZip (fixed-size crops)."""
    n = len(model.schedule.sa_candidates)
    v = model.config.vision_config
    settings = [Setting("base")] + [Setting("visor", b) for b in model.schedule.sa_budgets]
    if model.lm.policy is not None:
        settings.append(Setting("visor", "auto"))
    layer = max(2, len(getattr(v, "deepstack_visual_indexes", None) or []))
    settings += [Setting("fastv", "full", Reduction("fastv", layer=layer, keep=k)) for k in (0.5, 0.25, 0.125, 0.0625)]
    settings += [Setting("pdrop", "full", Reduction("pdrop", ratio=r)) for r in (0.5, 0.3, 0.15)]
    if Reduction("visionzip").refusal(model.config) is None:
        per_crop = (v.image_size // v.patch_size) ** 2
        for f in (0.5, 0.25, 0.125):
            dominant = max(1, round(per_crop * f * 0.85))
            zip_ = Reduction("visionzip", dominant=dominant, contextual=max(1, round(per_crop * f) - dominant))
            settings.append(Setting("visionzip", "full", zip_))
        zip_ = Reduction("visionzip", dominant=max(1, round(per_crop * 0.2)), contextual=max(1, round(per_crop * 0.05)))
        settings.append(Setting("visor+visionzip", n, zip_))
    return [s for s in settings if s.reduction is None or s.reduction.refusal(model.config) is None]


def compare(
    model,
    data,
    out,
    images=None,
    settings: list[Setting] | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    limit: int | None = None,
    base_model=None,
    overwrite: bool = False,
    prefill: str = "auto",
    decode: str = "auto",
) -> dict:
    """Every setting on one data set; ``base_model`` (the checkpoint VISOR was trained from), when
    given, runs the settings at budget "full" (the base and the token-reduction baselines, which
    need no training) so that they see the original weights, not VISOR's retrained ones.
    ``out``: new, empty, or (``overwrite``) an earlier compare output of visor."""
    from tqdm.auto import tqdm

    inputs = [data, images, model.backbone.path, base_model.backbone.path if base_model is not None else None]
    out = claim(out, "compare", COMPARE_ENTRIES, inputs, overwrite)  # before the minutes of the sweep
    settings = settings or default_settings(model)
    results = [
        evaluate(
            base_model if base_model is not None and (s.method == "base" or s.budget == "full") else model,
            data,
            images,
            s,
            batch_size,
            max_new_tokens,
            limit,
            prefill=prefill,
            decode=decode,
        )
        for s in tqdm(settings, desc="compare")
    ]
    base = next((r for r in results if r["method"] == "base"), results[0])
    base_flops = base["summary"]["overall"]["lm_prefill_flops"]
    for r in results:
        r["relative_lm_flops"] = r["summary"]["overall"]["lm_prefill_flops"] / base_flops
    atomic_write(out / "results.json", json.dumps({"results": results}, indent=2, default=str) + "\n")
    atomic_write(out / "report.md", report_markdown(results))
    pareto_plot(results, out / "pareto.png")
    return {"results": results, "report": str(out / "report.md"), "plot": str(out / "pareto.png")}


def display_name(method: str) -> str:
    """A method's published name (FastV, PyramidDrop, VisionZip, VISOR) for tables and legends; a note
    after the method's key stays ("pdrop (trained)" -> "PyramidDrop (trained)")."""
    from .reduce import NAMES

    key, space, note = method.partition(" ")
    names = {"visor": "VISOR", "base": "base", "visor+visionzip": "VISOR + VisionZip"} | NAMES
    return names.get(key, key) + space + note


def _family(r: dict, name: str) -> dict | None:
    return r["summary"]["overall"] if name == "all" else r["summary"]["family"].get(name)


FAMILY_ORDER = ("hard", "reasoning", "easy")  # the built-in benchmark's; others follow by name


def families(results: list[dict]) -> list[str]:
    """The task families the results cover, the built-in ones first (["all"] where no record names one)."""
    seen = {f for r in results for f in r["summary"]["family"]}
    order = sorted(seen, key=lambda f: (FAMILY_ORDER.index(f) if f in FAMILY_ORDER else len(FAMILY_ORDER), f))
    return order or ["all"]


def accuracy_cell(group: dict | None) -> str:
    """Accuracy (%) with its 95% Wilson interval."""
    if group is None:
        return "–"
    low, high = group["accuracy_ci"]
    return f"{100 * group['accuracy']:.1f} ({100 * low:.0f}–{100 * high:.0f})"


def report_markdown(results: list[dict]) -> str:
    names = [f for f in families(results) if f != "all"]  # the overall column follows anyway
    lines = [
        "# VISOR vs. token reduction (FastV, PyramidDrop, VisionZip)",
        "",
        f"| setting | {' | '.join(names)} | all | LM prefill FLOPs vs. base | prefill s |",
        "|---" * (len(names) + 4) + "|",
    ]
    for r in results:
        cells = " | ".join(accuracy_cell(_family(r, f)) for f in names)
        lines.append(
            f"| {r['setting']} | {cells} | {accuracy_cell(r['summary']['overall'])} | "
            f"{r['relative_lm_flops']:.3f} | {r['prefill_seconds']:.2f} |"
        )
    visor = [r for r in results if r["method"] == "visor" and r["budget"] != "auto"]
    baselines = sorted({r["method"] for r in results} - {"visor", "base"})
    if visor and baselines:
        lines += [
            "",
            "## At matched FLOPs (each baseline's setting nearest to the VISOR budget)",
            "",
            f"| VISOR budget | FLOPs | {' | '.join(names)} | "
            + " | ".join(f"{display_name(b)} (FLOPs, {', '.join(names)})" for b in baselines)
            + " |",
            "|---" * (2 + len(names) + len(baselines)) + "|",
        ]
        for v in visor:
            cells = []
            for b in baselines:
                near = min(
                    (r for r in results if r["method"] == b),
                    key=lambda r: abs(r["relative_lm_flops"] - v["relative_lm_flops"]),
                )
                accuracies = ", ".join(accuracy_cell(_family(near, f)) for f in names)
                cells.append(f"{near['relative_lm_flops']:.3f}, {accuracies}")
            own = " | ".join(accuracy_cell(_family(v, f)) for f in names)
            lines.append(f"| {v['budget']} | {v['relative_lm_flops']:.3f} | {own} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Accuracy: exact match after normalisation (%), with its 95% Wilson interval. "
        "FLOPs: language-model prefill, mean per sample, "
        "relative to the base model (all tokens, all layers).",
    ]
    return "\n".join(lines) + "\n"


def _with_intervals(points: list[tuple[float, dict]]):
    """x, accuracy (%) and its 95% interval as error-bar lengths, for (x, summary group) points."""
    xs = [x for x, _ in points]
    ys = [100 * g["accuracy"] for _, g in points]
    below = [100 * (g["accuracy"] - g["accuracy_ci"][0]) for _, g in points]
    above = [100 * (g["accuracy_ci"][1] - g["accuracy"]) for _, g in points]
    return xs, ys, [below, above]


def pareto_plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    min_x = min(r["relative_lm_flops"] for r in results)
    names = families(results)
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), sharex=True, squeeze=False)
    for ax, family in zip(axes[0], names):
        for method in sorted({r["method"] for r in results}):
            points = sorted(
                (r["relative_lm_flops"], _family(r, family))
                for r in results
                if r["method"] == method and r["budget"] != "auto" and _family(r, family) is not None
            )
            if points:
                xs, ys, errors = _with_intervals(points)
                faint = "no ft" in method  # the baselines on the base without VISOR's extra training
                style = "o" if method.startswith("base") else ("o--" if faint else "o-")
                name = display_name(method)
                lw = 2 if method == "visor" else 1.2
                ax.errorbar(xs, ys, errors, fmt=style, capsize=2, label=name, lw=lw, alpha=0.45 if faint else 1)
        for r in results:
            if r["budget"] == "auto" and _family(r, family) is not None:
                xs, ys, errors = _with_intervals([(r["relative_lm_flops"], _family(r, family))])
                ax.errorbar(xs, ys, errors, fmt="*", ms=14, capsize=2, label="VISOR auto")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks([x for x in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0) if x >= min_x / 1.5])
        ax.set_title("all tasks" if family == "all" else f"{family} tasks")
        ax.set_xlabel("language-model prefill FLOPs (relative to base)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
