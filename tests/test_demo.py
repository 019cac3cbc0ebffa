"""`visor demo --quick`: every stage runs and every artefact is produced and well-formed
(the accuracy targets are for the full run, not this one)."""

import json
import time
from dataclasses import replace

import numpy as np
import pytest
import yaml
from PIL import Image

from visor.demo import DemoConfig, run_demo


def test_quick_demo_produces_every_artefact(tmp_path, monkeypatch):
    quick = DemoConfig.quick()  # with a fine-tuning rate and budget weights of its own: where do they go?
    tuned = replace(quick, finetune_lr=2e-3, stage2_budget_weights=[1.0, 3.0, 1.0])
    monkeypatch.setattr(DemoConfig, "quick", classmethod(lambda cls: tuned))
    summary = run_demo(tmp_path, quick=True)
    report = (tmp_path / "report.md").read_text()
    assert "| base |" in report and "visor:0" in report and "## Targets" in report and "## Reproduce" in report
    for method in ("FastV", "PyramidDrop", "VisionZip", "visor:auto", "(trained)", "(no ft)", "## The router"):
        assert method in report
    assert "reasoning % (95% CI)" in report
    image = np.asarray(Image.open(tmp_path / "pareto.png").convert("RGB"))
    assert image.shape[0] > 300 and image.shape[1] > 800 and len(np.unique(image.reshape(-1, 3), axis=0)) > 20
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["quick"] and results["targets"] and len(results["results"]) >= 10
    methods = {r["method"] for r in results["results"]}
    assert methods >= {"base", "visor", "fastv", "pdrop", "visionzip", "pdrop (trained)", "visionzip (trained)"}
    assert {r["weights"] for r in results["results"]} == {"base", "base+ft", "visor", "pdrop+ft", "visionzip+ft"}
    assert summary["config"]["seed"] == 0
    heads = results["previous_token_attention"]  # where the base keeps its previous-token head, per layer
    assert len(heads["per_layer"]) == quick.layers and heads["sa_candidates"] == [1, 3]
    assert heads["strongest"] == max(range(quick.layers), key=heads["per_layer"].__getitem__)
    assert f"Strongest in layer {heads['strongest']}," in report
    assert heads["samples"] == quick.val_per_task and f"on {quick.val_per_task} validation samples" in report
    runs = [d for d in (tmp_path / "stages").iterdir() if (d / "config.yaml").exists()]  # the training stages
    trained = {d.name.split("-")[0]: yaml.safe_load((d / "config.yaml").read_text()) for d in runs}
    assert trained["stage2"]["budget_weights"] == [1.0, 3.0, 1.0]
    assert {trained[k]["lr"] for k in ("stage2", "base_ft", "pdrop_ft", "visionzip_ft")} == {2e-3}  # equal training
    assert {trained[k]["steps"] for k in ("base_ft", "pdrop_ft", "visionzip_ft")} == {
        trained["stage1"]["steps"] + trained["stage2"]["steps"]
    }
    # each baseline at a knob whose FLOPs match each VISOR budget's (1, 2) within 10%
    rows = results["results"]
    for b in (1, 2):
        visor_flops = next(r["relative_lm_flops"] for r in rows if r["method"] == "visor" and r["budget"] == b)
        for method in ("fastv", "pdrop", "visionzip"):
            fair = [r["relative_lm_flops"] for r in rows if r["method"] == method and r["weights"] == "base+ft"]
            assert min(abs(f / visor_flops - 1) for f in fair) <= 0.1, (b, method, fair, visor_flops)

    began = time.perf_counter()
    again = run_demo(tmp_path, quick=True)  # every stage is cached now
    assert time.perf_counter() - began < summary["elapsed_s"]
    assert again["timings_s"] == summary["timings_s"]  # the report keeps the times the stages took
    assert len(list((tmp_path / "stages").iterdir())) == 13

    other = run_demo(tmp_path, quick=True, seed=1)  # another seed: every stage anew, beside seed 0's
    assert other["config"]["seed"] == 1 and len(list((tmp_path / "stages").iterdir())) == 26
    assert "`visor demo --quick --seed 1`" in (tmp_path / "report.md").read_text()
    data = sorted((tmp_path / "stages").glob("data-*/train.jsonl"))
    assert len(data) == 2 and data[0].read_text() != data[1].read_text()


def test_vision_pretraining_teaches_each_patch_its_place(tmp_path):
    """The demo's tower learns where each patch lies in its crop (what lets the whole-image view
    tell where an object is) along with the digits: both well above chance in a few steps."""
    import visor
    from visor.demo import DemoConfig, pretrain_vision
    from visor.synth import make_dataset
    from visor.tiny import TinySpec, build_tiny

    cfg = DemoConfig()
    make_dataset(tmp_path / "data", 0, {"train": 40, "val": 1, "test": 1}, ["marked_digit"], cfg.image_size)
    spec = TinySpec(vision_hidden=64, vision_heads=4, image_size=cfg.tower_size, patch_size=cfg.patch_size)
    model = visor.load(build_tiny(tmp_path / "tiny", spec))
    summary = pretrain_vision(model, tmp_path / "data", steps=200, batch_size=8, seed=0)
    assert summary["patch_place_accuracy"] >= 0.5  # 9 places (48-pixel tower, 16-pixel patches): chance is 1/9
    assert summary["patch_digit_accuracy"] >= 0.5  # 10 digits
    assert summary["last_loss"] < summary["first_loss"]


@pytest.fixture(scope="module")
def demo_sized(tmp_path_factory):
    """A tiny LLaVA-OneVision at the demo's image geometry and digit grids for it (marked_digit)."""
    import visor
    from visor.demo import DemoConfig
    from visor.synth import make_dataset
    from visor.tiny import TinySpec, build_tiny

    tmp = tmp_path_factory.mktemp("demo_sized")
    cfg = DemoConfig()
    make_dataset(tmp / "data", 0, {"train": 40, "val": 1, "test": 1}, ["marked_digit"], cfg.image_size, progress=False)
    spec = TinySpec(vision_hidden=64, vision_heads=4, image_size=cfg.tower_size, patch_size=cfg.patch_size)
    return build_tiny(tmp / "tiny", spec), tmp / "data", visor


def test_grid_tokens_follow_the_models_own_anyres_packing(demo_sized):
    """Where the warm-up reads each grid cell's visual token is where transformers' own AnyRes packing
    (``pack_image_features``) puts the tile patch covering that cell: the crops are the whole image,
    then the 2 x 2 tiles row by row, each a 3 x 3 patch grid."""
    import torch

    from visor.backbone import load_image
    from visor.demo import grid_tokens

    path, data, visor = demo_sized
    model = visor.load(path)
    record = json.loads((data / "train.jsonl").read_text().splitlines()[0])
    towered = model.backbone.tower_batch([[load_image(data / record["image"])]])[0]
    crops, per_crop = towered.tokens.shape[:2]
    assert (crops, per_crop) == (5, 9)
    code = torch.zeros(crops, per_crop, model.config.text_config.hidden_size)
    code[..., 0] = torch.arange(crops * per_crop, dtype=torch.float32).view(crops, per_crop)  # each patch's name
    hf = model.backbone.hf.model
    newline = torch.full_like(hf.image_newline, -1.0)
    sizes = torch.tensor(towered.sizes)
    packed = hf.pack_image_features([code], sizes, newline, model.config.vision_aspect_ratio)[0][0]
    where = grid_tokens(towered, 6)
    for r in range(6):
        for c in range(6):
            crop, patch = 1 + (r // 3) * 2 + c // 3, (r % 3) * 3 + c % 3
            assert packed[where[r, c], 0].item() == crop * per_crop + patch, (r, c)
    assert packed[where[:, -1] + 1, 0].eq(-1).all()  # each row ends in a newline token
    with pytest.raises(visor.ConfigError, match="not one tile patch per cell"):
        grid_tokens(towered, 8)


def test_the_warm_up_asks_each_tile_token_for_the_digit_before_it():
    """Each image question of the warm-up sits at a cell's token and its answer is the label of the cell
    whose token comes just before (read back through the positions, not the grid)."""
    import torch

    from visor.demo import left_neighbours

    where = torch.tensor([[9 + r * 7 + c for c in range(6)] for r in range(6)])  # the demo's layout (test above)
    labels = torch.randint(10, (3, 6, 6))
    asking, told = left_neighbours(where, labels)
    cell_at = {where[r, c].item(): (r, c) for r in range(6) for c in range(6)}
    assert asking.shape == told.shape[1:] == (6, 5)
    for r in range(6):
        for c in range(5):
            before = cell_at[asking[r, c].item() - 1]  # the cell whose token precedes the asking one
            assert torch.equal(told[:, r, c], labels[:, before[0], before[1]])
    assert set(cell_at[p.item()][1] for p in asking.flatten()) == set(range(1, 6))  # every column but the first


def test_lm_warmup_teaches_the_previous_token(demo_sized):
    """The demo's LM warm-up: the language model learns to repeat the previous token of random sequences
    and to name the digit of the cell before each tile token (previous-token heads, on text and on images);
    the layers it is told to keep, and the tower, are untouched; the projector learns too."""
    import torch

    from visor.demo import warm_up_lm

    path, data, visor = demo_sized
    model = visor.load(path)
    before = {k: v.clone() for k, v in model.backbone.hf.state_dict().items()}
    summary = warm_up_lm(model, data, steps=100, batch_size=16, seed=0, frozen=[0], length=32, images=40)
    # chance: 1 / vocabulary (< 0.002) for the text; the demo's LM (hidden 128) reaches 1.0 on both in 150 steps
    assert summary["copy_accuracy"] > 0.05 and summary["last_loss"] < summary["first_loss"] - 1, summary
    after = model.backbone.hf.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("multi_modal_projector" in k for k in changed) and any("layers.1." in k for k in changed)
    assert all("language_model" in k or "lm_head" in k or "multi_modal_projector" in k for k in changed)
    assert not any("language_model.layers.0." in k for k in changed)  # frozen
    assert not any(p.requires_grad for p in model.backbone.hf.parameters())
    empty = data.parent / "empty"
    empty.mkdir()
    (empty / "train.jsonl").write_text("")
    with pytest.raises(visor.ConfigError, match="no digit grids"):
        warm_up_lm(model, empty, steps=1, batch_size=2, seed=0)
    assert not any(p.requires_grad for p in model.backbone.hf.parameters())  # refused before anything changed


def test_previous_token_attention_matches_a_hand_computed_first_layer(demo_sized):
    """The demo's head measurement (``previous_token_attention``), layer 0, against attention computed here
    from the layer's own weights: RMSNorm, q/k projections, rotary positions, grouped KV heads, causal softmax.
    And the report's verdict follows the strongest layer."""
    import json

    import torch

    from visor.demo import heads_section, previous_token_attention, where_heads_run
    from visor.schedule import Schedule

    path, data, visor = demo_sized
    model = visor.load(path, attn_implementation="eager")
    records = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()][:2]
    measured = previous_token_attention(model, records, data)
    assert len(measured) == model.lm.cfg.n_layers and all(0 < a < 1 for a in measured)

    lm = model.backbone.hf.model.language_model
    layer, cfg = lm.layers[0], model.backbone.hf.config.text_config
    heads, kv, dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    per_sample = []
    for r in records:
        sample = model.encode([r["question"]], [[data / r["image"]]])[0]
        ids = torch.tensor(sample.ids)
        is_image = ids == model.backbone.image_token_id
        x = lm.embed_tokens(ids)
        x[is_image] = sample.visual
        with torch.no_grad():
            h = layer.input_layernorm(x)  # (T, D)
            q = layer.self_attn.q_proj(h).view(len(ids), heads, dim).transpose(0, 1)  # (H, T, d)
            k = layer.self_attn.k_proj(h).view(len(ids), kv, dim).transpose(0, 1).repeat_interleave(heads // kv, 0)
            theta = cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else cfg.rope_theta
            freqs = torch.arange(len(ids))[:, None] / theta ** (torch.arange(0, dim, 2) / dim)  # (T, d/2)
            cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
            half = lambda t: torch.cat([-t[..., dim // 2 :], t[..., : dim // 2]], -1)  # noqa: E731
            q, k = q * cos + half(q) * sin, k * cos + half(k) * sin
            scores = (q @ k.transpose(1, 2)) / dim**0.5
            scores = scores.masked_fill(torch.ones(len(ids), len(ids)).triu(1).bool(), float("-inf"))
            attention = scores.softmax(-1)  # (H, T, T)
        pairs = [attention[:, t, t - 1] for t in range(1, len(ids)) if is_image[t] and is_image[t - 1]]
        per_sample.append(torch.stack(pairs).mean())  # each visual token's attention to the visual token before it
    assert abs(measured[0] - torch.stack(per_sample).mean().item()) < 6e-4  # measured: rounded to 3 places

    schedule = Schedule.from_spec("ca,sa,ca,sa,text,text", 6)  # budget 1 runs layer 1, budget 2 layers 1 and 3
    for per_layer, strongest, budgets in (([0.1, 0.7, 0, 0.2, 0, 0], 1, [1, 2]), ([0, 0.2, 0, 0.5, 0, 0], 3, [2]),
                                          ([0, 0.1, 0, 0.1, 0.3, 0], 4, [])):  # fmt: skip
        heads = where_heads_run(per_layer, schedule)
        assert (heads["strongest"], heads["run_by_budgets"]) == (strongest, budgets)
        verdict = "\n".join(heads_section(heads | {"samples": 16}))
        assert f"layer {strongest}," in verdict and ("no VISOR budget" in verdict) == (not budgets)


def _row(method, budget, flops, hard, reasoning, easy, weights="base+ft"):
    overall = (hard + reasoning + easy) / 300
    family = {
        "hard": {"accuracy": hard / 100},
        "reasoning": {"accuracy": reasoning / 100},
        "easy": {"accuracy": easy / 100},
    }
    summary = {"family": family, "overall": {"accuracy": overall}}
    return dict(method=method, budget=budget, relative_lm_flops=flops, summary=summary, setting=method, weights=weights)


def test_targets_are_read_off_the_numbers():
    from visor.demo import check_targets

    results = [
        _row("base", "full", 1.0, 100, 95, 99),
        _row("visor", 0, 0.17, 99, 80, 99, "visor"),
        _row("visor", 1, 0.31, 99, 80, 98, "visor"),
        _row("visor", 2, 0.45, 100, 94, 99, "visor"),
        _row("visor", "auto", 0.30, 99.5, 94, 99, "visor"),
        _row("fastv", "full", 0.47, 80, 60, 90),
        _row("pdrop", "full", 0.44, 95, 60, 90, "base"),  # on the base without extra training: not counted
        _row("pdrop (trained)", "full", 0.46, 60, 60, 90, "pdrop+ft"),
        _row("visionzip", "full", 0.30, 60, 20, 90),  # nothing within ±10% of budget 2's FLOPs
    ]
    met = [ok for _, ok, _ in check_targets(results)]
    #        base  gap0  budget 2  auto  FastV  PDrop  VisionZip
    assert met == [True, True, True, True, True, True, False]
    assert "budget 2" in check_targets(results)[2][0]
    results.append(_row("pdrop", "full", 0.44, 70, 60, 90))  # equally trained (base+ft): closer to VISOR on hard
    pdrop = check_targets(results)[5]
    assert pdrop[1] and pdrop[2].startswith("pdrop: hard 70.0 (30.0 points behind)")
    assert "pdrop (trained): hard 60.0 (40.0 points behind), reasoning 34.0 points behind" in pdrop[2]
    results.append(_row("pdrop", "full", 0.43, 101, 60, 90, "pdrop+ft"))  # one above VISOR on hard: missed
    assert not check_targets(results)[5][1] and "hard 101.0 (1.0 points ahead)" in check_targets(results)[5][2]
    del results[-2:]

    results[0] = _row("base", "full", 1.0, 100, 86, 99)  # budget 0 only 6 points below on reasoning
    results[4] = _row("visor", "auto", 0.40, 99.5, 94, 99, "visor")  # 0.89x budget 2's FLOPs: not cheap enough
    results[5] = _row("fastv", "full", 0.47, 92, 60, 90)  # only 8 points behind on hard
    met = [ok for _, ok, _ in check_targets(results)]
    assert met == [True, False, True, False, False, True, False]

    results[3] = _row("visor", 2, 0.45, 97, 94, 99, "visor")  # 3 points below the base on hard
    statements = check_targets(results)
    assert not statements[-1][1] and "within 2 points" in statements[-1][0] and "2: 3.0 at 0.45x" in statements[-1][2]


# The target the default demo misses at every seed where it was evaluated (README, "What is open"): PyramidDrop's
# ranking keeps the boxed cell's token, so on the hard family it matches or beats VISOR's budget 1.
KNOWN_MISS = "PyramidDrop (equal training) at the same FLOPs (±10%) >= 10 points below VISOR on hard"


@pytest.mark.slow
def test_default_demo_meets_its_targets(tmp_path):
    """The full `make demo` run (11-15 min on 2 cores): `make test-slow`. Every target is met but the one README
    reports missed, and the report marks a miss as one, with its numbers."""
    run_demo(tmp_path)
    targets = json.loads((tmp_path / "results.json").read_text())["targets"]
    assert len(targets) == 8, targets
    missed = [t for t in targets if not t["met"]]
    assert all(t["target"] == KNOWN_MISS and "hard" in t["numbers"] for t in missed), missed  # measured, not absent
    report = (tmp_path / "report.md").read_text()
    rows = [f"| {t['target']} | {'yes' if t['met'] else '**no**'} | {t['numbers']} |" for t in targets]
    assert all(row in report for row in rows), rows
