"""The evaluation harness and the comparison sweep."""

import json

import numpy as np
import pytest
from PIL import Image

import visor
from visor.evaluate import Setting, anls, compare, evaluate
from visor.reduce import Reduction
from visor.synth import make_dataset


def test_anls_as_docvqa_defines_it():
    """Case-insensitive, whitespace collapsed, punctuation kept; 1 - NL (edit distance / the longer
    length) below NL 0.5, else 0; the best of several references. A brute-force edit distance checks
    the library's."""

    def distance(a, b):  # Wagner-Fischer, the whole table
        table = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
        for i in range(1, len(a) + 1):
            for j in range(1, len(b) + 1):
                table[i][j] = min(
                    table[i - 1][j] + 1, table[i][j - 1] + 1, table[i - 1][j - 1] + (a[i - 1] != b[j - 1])
                )
        return table[-1][-1]

    assert anls("  HELLO   World ", "hello world") == 1.0
    assert anls("Hello.", "hello") == pytest.approx(1 - 1 / 6)
    assert anls("helo", "hello") == pytest.approx(0.8)
    assert anls("xyz", "hello") == 0.0  # NL 1
    assert anls("abcd", "abef") == 0.0  # NL exactly 0.5: not below the threshold
    assert anls("helo", ["goodbye", "hello", "hell"]) == pytest.approx(0.8)  # the best reference
    for a, b in [("kitten", "sitting"), ("flaw", "lawn"), ("receipt total", "receipt totals")]:
        nl = distance(a, b) / max(len(a), len(b))
        assert anls(a, b) == pytest.approx(1 - nl if nl < 0.5 else 0.0)


def test_wilson_interval():
    from visor.evaluate import wilson

    low, high = wilson(81, 100)  # a textbook value: 0.72 to 0.87 (Wilson, z = 1.96)
    assert low == pytest.approx(0.7222, abs=1e-3) and high == pytest.approx(0.8744, abs=1e-3)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == pytest.approx(1.0)
    assert wilson(5, 10)[0] == pytest.approx(1 - wilson(5, 10)[1])  # symmetric at one half
    for n in (1, 7, 100, 300, 600):  # the interval holds the proportion, also at 0 and 1 (error bars >= 0)
        assert all(wilson(k, n)[0] <= k / n <= wilson(k, n)[1] for k in range(n + 1))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    make_dataset(out, seed=0, sizes={"train": 0, "val": 0, "test": 2}, image_size=64, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def model(checkpoints):
    return visor.load(checkpoints["llava-onevision"])


def test_accuracy_counts_exact_matches(model, bench, tmp_path):
    """Answers set to the model's own greedy output must all count as correct, per task and family."""
    first = evaluate(model, bench / "test.jsonl", setting=Setting("visor", 1), max_new_tokens=4, progress=False)
    rows = [json.loads(line) for line in (bench / "test.jsonl").read_text().splitlines()]
    for row, result in zip(rows, first["rows"]):
        row["answer"] = result["prediction"] or "x"
    (tmp_path / "own.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    again = evaluate(model, tmp_path / "own.jsonl", bench, Setting("visor", 1), max_new_tokens=4, progress=False)
    empty = sum(1 for r in first["rows"] if not r["prediction"])
    s = again["summary"]
    assert s["overall"]["accuracy"] == pytest.approx(1 - empty / len(rows))
    assert set(s["family"]) == {"hard", "reasoning", "easy"} and len(s["task"]) == 10
    assert all(r["prefill_flops"] > r["lm_prefill_flops"] > 0 for r in again["rows"])


def test_baselines_save_flops(model, bench):
    kwargs = dict(max_new_tokens=2, progress=False, limit=6)
    base = evaluate(model, bench / "test.jsonl", setting=Setting("base"), **kwargs)["summary"]["overall"]
    for setting in [Setting("fastv", "full", Reduction("fastv", keep=0.25)), Setting("visor", 0),
                    Setting("visionzip", "full", Reduction("visionzip", dominant=8, contextual=2))]:  # fmt: skip
        s = evaluate(model, bench / "test.jsonl", setting=setting, **kwargs)["summary"]["overall"]
        assert s["lm_prefill_flops"] < base["lm_prefill_flops"]


def test_compare_writes_a_table_and_a_plot(model, bench, tmp_path):
    result = compare(model, bench / "test.jsonl", tmp_path, max_new_tokens=2)
    report = (tmp_path / "report.md").read_text()
    assert "| base |" in report and "At matched FLOPs" in report and "FastV(" in report and "VisionZip(" in report
    assert "PyramidDrop" in report and "fastv" not in report  # published names only
    image = Image.open(tmp_path / "pareto.png")
    assert image.size[0] > 1800 and image.size[1] > 300  # a panel per family: hard, reasoning, easy
    assert "| setting | hard | reasoning | easy | all |" in report
    pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # lines and text, not a blank canvas
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["results"]) == len(result["results"]) >= 10
    assert {r["method"] for r in data["results"]} >= {"base", "visor", "fastv", "pdrop", "visionzip"}


def test_settings_of_one_model_share_its_encoded_prompts(model, bench):
    """``encoded``: the second setting on the same model runs no vision tower and scores as a fresh
    evaluation does; a VisionZip setting encodes its own prompts."""
    data, crops = bench / "test.jsonl", []
    tower = model.backbone.hf.model.vision_tower
    hook = tower.register_forward_pre_hook(lambda m, a: crops.append(a[0].shape[0]))
    settings = [Setting("visor", 1), Setting("fastv", "full", Reduction("fastv", layer=1, keep=0.5)),
                Setting("visionzip", "full", Reduction("visionzip", dominant=4, contextual=1))]  # fmt: skip
    kept, shared = {}, []
    try:
        for s in settings:
            before = len(crops)
            shared.append((evaluate(model, data, None, s, 8, 4, encoded=kept), sum(crops[before:])))
    finally:
        hook.remove()
    assert shared[0][1] > 0 and shared[1][1] == 0 and shared[2][1] > 0
    plain = next(v for (_, _, zip_), v in kept.items() if zip_ is None)  # kept by (question, images, VisionZip)
    with pytest.raises(visor.ConfigError, match=r"encoded without VisionZip; .* encoded with VisionZip\(4\+1\)"):
        model.generate_encoded([plain], "full", 2, reduction=settings[2].reduction)
    again = evaluate(model, data, None, settings[0], 8, 4, encoded=kept)  # after the others: nothing kept changed
    assert again["summary"] == shared[0][0]["summary"]
    for (result, _), s in zip(shared, settings):
        fresh = evaluate(model, data, None, s, 8, 4)
        assert [r["prediction"] for r in result["rows"]] == [r["prediction"] for r in fresh["rows"]]
        assert result["summary"] == fresh["summary"]


def test_models_with_one_tower_share_its_outputs(model, checkpoints, bench):
    """``towers``: a model with the same tower (its projector and LM changed, as fine-tuning with the tower
    frozen changes them) runs no tower, for a VisionZip setting with another knob neither, and scores as a
    fresh evaluation does; a model whose tower differs runs its own."""
    import torch

    data, gen = bench / "test.jsonl", torch.Generator().manual_seed(0)
    tuned, other = visor.load(checkpoints["llava-onevision"]), visor.load(checkpoints["llava-onevision"])
    hf = tuned.backbone.hf.model
    with torch.no_grad():
        for p in [*hf.multi_modal_projector.parameters(), *hf.language_model.parameters(),
                  *other.backbone.hf.model.vision_tower.parameters()]:  # fmt: skip
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    crops = {id(m): [] for m in (model, tuned, other)}
    towered = lambda m: lambda _, a: crops[id(m)].append(a[0].shape[0])  # noqa: E731 - counts m's tower's crops
    hooks = [m.backbone.hf.model.vision_tower.register_forward_pre_hook(towered(m)) for m in (model, tuned, other)]
    zipped = lambda n: Setting("visionzip", "full", Reduction("visionzip", dominant=n, contextual=1))  # noqa: E731
    towers, runs = {}, {}
    try:
        for m, settings in ((model, [Setting("visor", 1), zipped(4)]), (tuned, [Setting("visor", 1), zipped(2)]),
                            (other, [Setting("visor", 1)])):  # fmt: skip
            runs[id(m)] = [evaluate(m, data, None, s, 8, 4, progress=False, towers=towers) for s in settings]
    finally:
        for h in hooks:
            h.remove()
    assert crops[id(model)] and not crops[id(tuned)] and crops[id(other)]
    assert len(towers) == 3  # the tower plain and for VisionZip; the other tower plain
    for result, s in zip(runs[id(tuned)], [Setting("visor", 1), zipped(2)]):
        fresh = evaluate(tuned, data, None, s, 8, 4, progress=False)
        assert [r["prediction"] for r in result["rows"]] == [r["prediction"] for r in fresh["rows"]]
        assert result["summary"] == fresh["summary"]
    before = [r["prediction"] for r in runs[id(model)][0]["rows"]]
    assert before != [r["prediction"] for r in runs[id(tuned)][0]["rows"]]  # its own projector and LM ran


def test_compare_runs_base_and_baselines_on_the_base_weights(model, checkpoints, bench, tmp_path):
    """With base_model, the rows at budget "full" (base, token reduction) come from it, VISOR's from the model."""
    import torch

    retrained = visor.load(checkpoints["llava-onevision"])
    with torch.no_grad():  # stands in for the weights VISOR's stage 2 changed
        for p in retrained.backbone.hf.model.language_model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    data = bench / "test.jsonl"
    settings = [Setting("base"), Setting("fastv", "full", Reduction("fastv", layer=1, keep=0.5)), Setting("visor", 1)]
    rows = compare(retrained, data, tmp_path, settings=settings, max_new_tokens=4, base_model=model)
    predictions = lambda r: [x["prediction"] for x in r["rows"]]  # noqa: E731
    for result, setting, source in zip(rows["results"], settings, [model, model, retrained]):
        assert predictions(result) == predictions(evaluate(source, data, None, setting, 8, 4))
    assert predictions(rows["results"][0]) != predictions(evaluate(retrained, data, None, settings[0], 8, 4))


@pytest.mark.parametrize(
    "arch, baselines",
    [
        ("llava-onevision", {"fastv", "pdrop", "visionzip", "visor+visionzip"}),
        ("llava", {"fastv", "pdrop", "visionzip", "visor+visionzip"}),
        ("qwen2.5-vl", {"fastv"}),  # M-RoPE (no PyramidDrop renumbering), dynamic resolution (no VisionZip)
        ("qwen3-vl", {"fastv"}),
        ("internvl", {"fastv", "pdrop"}),  # a pixel-shuffle projector: no VisionZip
    ],
)
def test_compare_sweeps_the_baselines_each_family_defines(checkpoints, arch, baselines):
    from visor.evaluate import default_settings

    model = visor.load(checkpoints[arch])
    settings = default_settings(model)
    assert {s.method for s in settings} == {"base", "visor"} | baselines
    deepstack = len(getattr(model.config.vision_config, "deepstack_visual_indexes", None) or [])
    assert all(s.reduction.layer >= max(2, deepstack) for s in settings if s.method == "fastv")
    refused = Reduction("visionzip") if "visionzip" not in baselines else None
    if refused is not None:  # asked for anyway: one clear error before any work (no file is read)
        with pytest.raises(visor.ConfigError, match="VisionZip works on"):
            model.generate(checkpoints[arch] / "missing.png", "What is shown?", reduction=refused)
        with pytest.raises(visor.ConfigError, match="VisionZip works on"):
            evaluate(model, checkpoints[arch] / "missing.jsonl", setting=Setting("visionzip", "full", refused))
