"""The budget policy: a small MLP that picks, per sample, how many SA layers to run.

It reads a cheap probe: the layers up to and including the first CA layer run at budget 0 (on the
text tokens only, which read the visual tokens through cross-attention there), then the visual and
the text states are mean-pooled; so the router sees the question after it has looked at the image,
not only the raw embeddings. It scores the budgets 0..n; ``budget="auto"`` runs the probe, then the
prefill at the chosen budget. Where no SA candidate comes before the first CA layer (e.g.
``ca,sa,ca,sa,...``) the probe's layers are the first layers of every budget's prefill, which goes on
from them: the router costs its MLP alone. Otherwise the probe is extra work, counted in the sample's
prefill ("router") with the MLP.

Labels (``visor train-policy``): every budget is scored on every sample, then the label is the
cheapest budget whose score reaches 99% of the score at the largest budget n (all candidates).
Score: exact match (after normalisation) of the greedy answer when the reference answer is short
(<= 3 words), else the answer's per-token likelihood exp(mean log p) under teacher forcing.
At inference the choice is argmax_b [log p(b) - cost_weight * b / n]: ``cost_weight`` > 0 trades
accuracy for FLOPs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import checks
from .errors import ConfigError
from .outputs import atomic_write, claim

SHORT_ANSWER_WORDS = 3
TARGET_FRACTION = 0.99


class Policy(nn.Module):
    def __init__(self, hidden: int, n_budgets: int, width: int = 256, cost_weight: float = 0.0, probe_layers: int = 0):
        super().__init__()
        self.config = {"width": width, "n_budgets": n_budgets, "cost_weight": cost_weight, "probe_layers": probe_layers}
        self.register_buffer("mean", torch.zeros(2 * hidden))  # feature standardisation, set by fit_policy
        self.register_buffer("std", torch.ones(2 * hidden))
        self.net = nn.Sequential(nn.Linear(2 * hidden, width), nn.GELU(), nn.Linear(width, n_budgets))

    @staticmethod
    def features(v, t, visual_valid, text_valid) -> torch.Tensor:
        """Masked mean of visual and of text states: (B, 2D), in float32."""

        def pool(x, valid):
            w = valid[..., None].float()
            return (x.float() * w).sum(1) / w.sum(1).clamp(min=1)

        return torch.cat([pool(v, visual_valid), pool(t, text_valid)], -1)

    def forward(self, features):  # (B, 2D) -> budget logits (B, n_budgets)
        x = (features.float() - self.mean) / self.std
        return self.net(x.to(self.net[0].weight.dtype))

    def choose(self, features, cost_weight: float | None = None) -> torch.Tensor:
        cost_weight = self.config["cost_weight"] if cost_weight is None else cost_weight
        n = self.config["n_budgets"]
        cost = torch.arange(n, device=features.device) / max(1, n - 1)
        return (F.log_softmax(self(features).float(), -1) - cost_weight * cost).argmax(-1)


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def is_short(answer: str) -> bool:
    return len(answer.split()) <= SHORT_ANSWER_WORDS


def label_budgets(scores: torch.Tensor) -> torch.Tensor:
    """scores (N, n_budgets), budgets in increasing cost -> the cheapest budget per sample whose
    score reaches TARGET_FRACTION of the score at the largest budget."""
    target = TARGET_FRACTION * scores[:, -1:]
    good = scores >= target - 1e-12
    return good.float().argmax(-1)  # the first budget that is good enough (the last one always is)


@dataclass
class PolicyTrainConfig:
    width: int = 256
    epochs: int = 300
    lr: float = 3e-3
    cost_weight: float = 0.0
    seed: int = 0
    holdout: float = 0.2  # fraction of the samples the report is measured on, kept out of the fit

    def __post_init__(self):
        checks.number("holdout", self.holdout, 0, 0.9)
        checks.count("width", self.width, 1)
        checks.count("epochs", self.epochs, 1)
        checks.number("lr", self.lr, 0, low_open=True)
        checks.number("cost_weight", self.cost_weight, 0)
        checks.count("seed", self.seed)


def fit_policy(
    features: torch.Tensor, labels: torch.Tensor, n_budgets: int, cfg: PolicyTrainConfig, probe_layers: int = 0
) -> Policy:
    """Full-batch cross-entropy on (features, labels: the probe's after ``probe_layers`` layers),
    features standardised, for at most ``cfg.epochs`` epochs: as many as gave the lowest loss on a
    seeded fifth of the samples kept out of a first fit (``stopping_epochs``), then on all of them. The
    labels are noisy — a lucky guess labels a sample with a budget too small for its kind — and an MLP
    left to run learns those samples by heart and routes others like them too low."""
    return _fit(features, labels, n_budgets, cfg, probe_layers, stopping_epochs(features, labels, n_budgets, cfg))


def stopping_epochs(features: torch.Tensor, labels: torch.Tensor, n_budgets: int, cfg: PolicyTrainConfig) -> int:
    """The epoch count (1..cfg.epochs) with the lowest loss on a seeded fifth of the samples, fitted on
    the rest; ``cfg.epochs`` with fewer than 50 samples (a fifth of them too few to judge by)."""
    if len(features) < 50:
        return cfg.epochs
    fit, check = holdout_split(len(features), 0.2, cfg.seed + 1)
    losses = []  # after each epoch, on the samples set aside
    record = lambda policy: losses.append(F.cross_entropy(policy(features[check]), labels[check]).item())  # noqa: E731
    _fit(features[fit], labels[fit], n_budgets, cfg, 0, cfg.epochs, record)
    return 1 + min(range(cfg.epochs), key=losses.__getitem__)


def _fit(features, labels, n_budgets: int, cfg: PolicyTrainConfig, probe_layers: int, epochs: int, after_epoch=None):
    torch.manual_seed(cfg.seed)
    policy = Policy(features.shape[1] // 2, n_budgets, cfg.width, cfg.cost_weight, probe_layers)
    policy.mean.copy_(features.mean(0))
    policy.std.copy_(features.std(0).clamp(min=1e-6) if len(features) > 1 else torch.ones_like(features[0]))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    for _ in range(epochs):
        with torch.enable_grad():
            loss = F.cross_entropy(policy(features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if after_epoch is not None:
            with torch.no_grad():
                after_epoch(policy)
    return policy


REPORT_ENTRIES = ("final", "policy_report.json", "policy_report.md")


def holdout_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices the router is fitted on, indices its report is measured on): a seeded shuffle, the
    held-out share rounded, at least one sample left to fit."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_held = min(round(n * fraction), n - 1) if n > 1 else 0
    return order[n_held:].sort().values, order[:n_held].sort().values


class Scored(NamedTuple):
    """Every budget tried on every sample of a labelled set (what the router is fitted on)."""

    scores: torch.Tensor  # (N, budgets): exact match, or the answer's likelihood for long answers
    prefill_flops: torch.Tensor  # (N, budgets) float64
    features: dict  # {probe depth: (N, 2D) the probe's features}
    shapes: list  # each sample's (n_visual, n_text, n_crops, grids)


def router_flops(model, shapes: list, policy: Policy) -> torch.Tensor:
    """The router's prefill FLOPs (its probe and MLP) for samples of these ``Scored.shapes``. (N,) float64"""
    flops = [
        model.flops(v, t, 0, c, grids=g, router=policy.config).breakdown["prefill"]["router"] for v, t, c, g in shapes
    ]
    return torch.tensor(flops, dtype=torch.float64)


def score_budgets(model, records: list, batch_size: int, depths: tuple[int, ...]) -> Scored:
    """Run every budget on every record (greedy answers; likelihood for long ones) and the probe at
    each of ``depths`` (see ``VisorLM.probe``)."""
    from tqdm.auto import tqdm

    from .data import tokenize
    from .generate import GenerationConfig, collate, generate
    from .train import answer_token_losses

    depths = tuple(dict.fromkeys(depths))  # each once
    budgets = model.schedule.sa_budgets
    bb, lm = model.backbone, model.lm
    runner = model.runner("eager", "dynamic")  # answers of every length: shapes no compiled path would reuse
    scores = torch.zeros(len(records), len(budgets))
    prefill_flops = torch.zeros(len(records), len(budgets), dtype=torch.float64)
    features, shapes = {d: [] for d in depths}, []
    with torch.no_grad(), tqdm(total=len(records) * len(budgets), desc="scoring budgets") as bar:
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            samples = model.encode([r.turns[0][1] for r in chunk], [r.images for r in chunk])
            tok = collate(samples, bb.image_token_id, bb.device, runner.buckets)
            for d in depths:
                features[d].append(lm.policy_features(tok, d).cpu())
            shapes += [(s.visual.shape[0], len(s.ids) - s.visual.shape[0], s.n_crops, s.grids) for s in samples]
            answers = [r.answer for r in chunk]
            longest = max(len(bb.tokenizer(a)["input_ids"]) for a in answers) + 4
            long_rows = [i for i, a in enumerate(answers) if not is_short(a)]  # scored by likelihood
            batch = [(*tokenize(bb, chunk[i]), chunk[i].load_images()) for i in long_rows]
            for b in budgets:
                new = generate(runner, tok, b, GenerationConfig(max_new_tokens=longest), bb.eos_token_ids).tokens
                if long_rows:
                    losses, owner, _ = answer_token_losses(bb, lm, batch, b)
                    mean = torch.zeros(len(batch)).index_add_(0, owner.cpu(), losses.cpu()) / torch.bincount(
                        owner.cpu(), minlength=len(batch)
                    ).clamp(min=1)
                for i, (sample, ids) in enumerate(zip(samples, new)):
                    if is_short(answers[i]):
                        text = bb.tokenizer.decode(ids, skip_special_tokens=True)
                        scores[start + i, b] = float(normalise(text) == normalise(answers[i]))
                    else:
                        scores[start + i, b] = torch.exp(-mean[long_rows.index(i)])
                    n_visual = sample.visual.shape[0]
                    report = model.flops(n_visual, len(sample.ids) - n_visual, b, sample.n_crops, grids=sample.grids)
                    prefill_flops[start + i, b] = report.prefill
                bar.update(len(chunk))
    return Scored(scores, prefill_flops, {d: torch.cat(f) for d, f in features.items()}, shapes)


def train_policy(
    model_path,
    data,
    images,
    out,
    cfg: PolicyTrainConfig,
    batch_size: int = 8,
    overwrite: bool = False,
    device: str = "auto",
    dtype: str = "float32",
) -> dict:
    """Score every budget on (data, images), label, fit the router, save ``out/final`` and a report.
    ``out``: new, empty, or (``overwrite``) an earlier train-policy output of visor. ``out/final`` is
    an adapter holding the VISOR weights as loaded (``dtype`` float32 keeps a float32 checkpoint's exact)."""
    import json
    from pathlib import Path

    from .api import load
    from .data import read_records

    checks.count("batch_size", batch_size, 1)
    claim(out, "train-policy", REPORT_ENTRIES, [model_path, data, images], overwrite)
    model = load(model_path, dtype=dtype, device=device)
    if not model.schedule.sa_candidates:
        raise ConfigError(f"{model_path}: the schedule has no SA candidate, so there is no budget to choose")
    budgets = model.schedule.sa_budgets
    records, skipped = read_records(data, images)
    depth = model.schedule.probe_layers
    scores, prefill_flops, features, shapes = score_budgets(model, records, batch_size, (depth,))
    features = features[depth]
    labels = label_budgets(scores)
    fit, held = holdout_split(len(records), cfg.holdout, cfg.seed)
    epochs = stopping_epochs(features[fit], labels[fit], len(budgets), cfg)  # as fit_policy, for the report
    policy = _fit(features[fit], labels[fit], len(budgets), cfg, depth, epochs)
    report_on = held if len(held) else fit  # too few samples to hold any out: say so
    with torch.no_grad():
        chosen = policy.choose(features[report_on])
    router = router_flops(model, [shapes[i] for i in report_on.tolist()], policy)
    scores, prefill_flops = scores[report_on], prefill_flops[report_on]
    rows = [
        {"budget": b, "score": scores[:, b].mean().item(), "prefill_flops": prefill_flops[:, b].mean().item()}
        for b in budgets
    ]
    pick = torch.arange(len(report_on))
    rows.append(
        {
            "budget": "auto",
            "score": scores[pick, chosen].mean().item(),
            "prefill_flops": (prefill_flops[pick, chosen] + router).mean().item(),  # the probe's too
            "chosen": torch.bincount(chosen, minlength=len(budgets)).tolist(),
        }
    )
    model.lm.policy = policy.to(model.backbone.device)
    out = Path(out)
    final = model.save(out / "final", overwrite=True, adapter=True)  # the router is all that changed
    result = {
        "rows": rows,
        "labels": torch.bincount(labels[fit], minlength=len(budgets)).tolist(),
        "n_samples": len(records),
        "n_fit": len(fit),
        "n_held_out": len(held),
        "epochs_fitted": epochs,
        "measured_on": "held-out samples" if len(held) else "the fitted samples (too few to hold any out)",
        **model.placement,
        "skipped": skipped,
        "config": cfg.__dict__,
        "rule": __doc__,
    }
    atomic_write(out / "policy_report.json", json.dumps(result, indent=2) + "\n")
    lines = [
        f"Measured on {result['measured_on']}: {len(report_on)} of {len(records)} "
        f"(the router was fitted on {len(fit)}, for {epochs} epochs: where the loss on a fifth "
        "of them, set aside, was lowest).",
        "",
        "| budget | score | mean prefill GFLOPs (vision tower + LM) |",
        "|---|---|---|",
    ]
    lines += [f"| {r['budget']} | {r['score']:.3f} | {r['prefill_flops'] / 1e9:.4f} |" for r in rows]
    atomic_write(out / "policy_report.md", "\n".join(lines) + "\n")
    return result | {"final": str(final)}
