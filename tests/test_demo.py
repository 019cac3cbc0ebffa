"""`visor demo --quick`: every stage runs and every artefact is produced and well-formed
(the accuracy targets are for the full run, not this one)."""

import json
import time

import numpy as np
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
