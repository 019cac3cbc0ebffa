"""`visor demo --quick`: every stage runs and every artefact is produced and well-formed
(the accuracy targets are for the full run, not this one)."""

import json
import time

import numpy as np
import pytest
from PIL import Image

from visor.demo import run_demo


def test_quick_demo_produces_every_artefact(tmp_path):
    summary = run_demo(tmp_path, quick=True)
    report = (tmp_path / "report.md").read_text()
    assert "| base |" in report and "visor:0" in report and "## Targets" in report and "## Reproduce" in report
    for method in ("fastv", "pdrop", "visionzip", "visor:auto"):
        assert method in report
    image = np.asarray(Image.open(tmp_path / "pareto.png").convert("RGB"))
    assert image.shape[0] > 300 and image.shape[1] > 800 and len(np.unique(image.reshape(-1, 3), axis=0)) > 20
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["quick"] and results["targets"] and len(results["results"]) >= 10
    assert {r["method"] for r in results["results"]} >= {"base", "visor", "fastv", "pdrop", "visionzip"}
    assert summary["config"]["seed"] == 0

    began = time.perf_counter()
    again = run_demo(tmp_path, quick=True)  # every stage is cached now
    assert time.perf_counter() - began < summary["elapsed_s"]
    assert again["timings_s"] == summary["timings_s"]  # the report keeps the times the stages took
    assert len(list((tmp_path / "stages").iterdir())) == 7


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
    assert summary["patch_place_accuracy"] >= 0.5  # 16 places: chance is 1/16
    assert summary["patch_digit_accuracy"] >= 0.5  # 10 digits
    assert summary["last_loss"] < summary["first_loss"]


def _row(method, budget, flops, hard, easy, setting=None):
    overall = (hard + 2 * easy) / 300
    family = {"hard": {"accuracy": hard / 100}, "easy": {"accuracy": easy / 100}}
    summary = {"family": family, "overall": {"accuracy": overall}}
    return dict(method=method, budget=budget, relative_lm_flops=flops, summary=summary, setting=setting or method)


def test_targets_are_read_off_the_numbers():
    from visor.demo import check_targets

    results = [
        _row("base", "full", 1.0, 100, 99),
        _row("visor", 0, 0.17, 95, 90),
        _row("visor", 1, 0.31, 99, 98),
        _row("visor", 2, 0.45, 100, 99),
        _row("visor", "auto", 0.25, 98, 95),
        _row("fastv", "full", 0.32, 80, 90),
        _row("pdrop", "full", 0.30, 60, 90),
        _row("visionzip", "full", 0.50, 60, 90),  # nothing within ±10% of budget 1's FLOPs
    ]
    met = {statement.split(" ")[0]: ok for statement, ok, _ in check_targets(results)}
    assert met == {"base": True, "VISOR": True, "fastv": True, "pdrop": True, "visionzip": False, "auto": True}

    results[2] = _row("visor", 1, 0.31, 99, 96)  # 3 points below the base on easy
    results[5] = _row("fastv", "full", 0.29, 92, 90)  # only 7 points behind on hard
    results[4] = _row("visor", "auto", 0.25, 90, 90)  # below the line through budgets 0 and 1
    met = {statement.split(" ")[0]: ok for statement, ok, _ in check_targets(results)}
    assert met == {"base": True, "VISOR": False, "fastv": False, "pdrop": True, "visionzip": False, "auto": False}


@pytest.mark.slow
def test_default_demo_meets_every_target(tmp_path):
    """The full `make demo` run (~12 min on 2 cores): `make test-slow`."""
    run_demo(tmp_path)
    targets = json.loads((tmp_path / "results.json").read_text())["targets"]
    assert len(targets) == 7 and all(t["met"] for t in targets), targets
