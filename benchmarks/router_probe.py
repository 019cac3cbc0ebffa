"""Where should the budget router look? (a measurement, not a test)

Fits the router twice on the same labels of a validation set: once on the inputs of layer 0 (pooled
projector outputs and token embeddings: what it read before, on the default schedule) and once on
the probe after the first CA layer (what it reads now, ``VisorLM.probe``), and reports each on the
same held-out samples: how often it picks the labelled budget, its mean score and its mean prefill
FLOPs (the router's own included: the MLP, and the probe's layers where they are not the start of the
prefill, see ``Schedule.shares_probe``).

    python benchmarks/router_probe.py --model runs/demo/stages/stage2-*/final \
        --data runs/demo/stages/data-*/val.jsonl --out benchmarks/results/router_probe.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    import visor
    from visor.data import read_records
    from visor.policy import (
        PolicyTrainConfig,
        fit_policy,
        holdout_split,
        label_budgets,
        router_flops,
        score_budgets,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a VISOR checkpoint after stage 2")
    parser.add_argument("--data", required=True, help="a labelled set (JSONL), e.g. the demo's val.jsonl")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/router_probe.json"))
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--width", type=int, default=64, help="the router MLP's hidden width (the demo's)")
    args = parser.parse_args()

    model = visor.load(args.model)
    records, _ = read_records(args.data, Path(args.data).parent)
    probe = model.schedule.probe_layers
    scored = score_budgets(model, records, 16, (0, probe))
    labels = label_budgets(scored.scores)
    cfg = PolicyTrainConfig(args.width, args.epochs)
    fit, held = holdout_split(len(records), cfg.holdout, cfg.seed)
    result = {"model": args.model, "data": args.data, "n_fit": len(fit), "n_held_out": len(held), "routers": {}}
    result["labels_held_out"] = torch.bincount(labels[held], minlength=scored.scores.shape[1]).tolist()
    names = {0: "inputs of layer 0", probe: f"after the first CA layer ({probe} layers)"}  # one if no CA layer
    for depth, name in names.items():
        features = scored.features[depth]
        policy = fit_policy(features[fit], labels[fit], scored.scores.shape[1], cfg, depth)
        with torch.no_grad():
            chosen = policy.choose(features[held])
        pick = torch.arange(len(held))
        router = router_flops(model, [scored.shapes[i] for i in held.tolist()], policy)
        flops = scored.prefill_flops[held][pick, chosen] + router
        result["routers"][name] = {
            "label_accuracy": (chosen == labels[held]).float().mean().item(),
            "score": scored.scores[held][pick, chosen].mean().item(),
            "prefill_flops": flops.mean().item(),
            "chosen": torch.bincount(chosen, minlength=scored.scores.shape[1]).tolist(),
        }
    for b in range(scored.scores.shape[1]):
        result[f"budget {b}"] = {
            "score": scored.scores[held, b].mean().item(),
            "prefill_flops": scored.prefill_flops[held, b].mean().item(),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
