"""`visor bench` on tiny shapes: every field of its JSON, and the numbers that can be checked."""

import dataclasses
import json

import pytest
from test_cli import visor_cli

from visor.backbone import read_config
from visor.bench import BenchConfig, builtin_config, run_bench
from visor.errors import VisorError
from visor.flops import count_flops
from visor.model import LMConfig
from visor.schedule import Schedule

PHASES = {"vision_ms", "prefill_ms", "ttft_ms", "decode_ms", "first_step_ms"}
ROW_FIELDS = PHASES | {
    "method",
    "budget",
    "spread_ms",
    "peak_memory_bytes",
    "kv_cache_bytes",
    "flops",
    "tflops_per_s",
    "tokens",
    "speedup_vs_hf",
    "speedup_vs_best_hf",
    "speedup_vs_full",
    "serving",
    "same_tokens_as_hf",
    "prefill_logits_diff_vs_hf",
}
V, T, NEW = 40, 12, 6


def test_bench_cli_emits_the_whole_schema(checkpoints, tmp_path):
    config = checkpoints["llava-onevision"] / "config.json"
    args = ["--config", config, "--visual-tokens", V, "--text-tokens", T, "--new-tokens", NEW, "--batch", 2]
    args += ["--methods", "hf,full,visor:0,visor:2", "--repeats", 2, "--warmup", 1, "--json", "--out", tmp_path]
    result = json.loads(visor_cli("bench", *args))
    assert json.loads((tmp_path / "bench.json").read_text()) == result
    assert set(result) == {"device", "versions", "config", "model", "methods"}
    assert set(result["versions"]) == {"visor", "torch", "transformers"}
    assert result["config"]["decode"] == "dynamic" and result["config"]["dtype"] == "float32"
    assert result["config"]["prefill"] == "eager"
    assert [r["method"] for r in result["methods"]] == ["hf", "full", "visor:0", "visor:2"]
    for row in result["methods"]:
        assert set(row) == ROW_FIELDS
        assert all(row[k] > 0 for k in PHASES)
        assert all(len(row["spread_ms"][k]) == 2 and row["spread_ms"][k][0] <= row[k] for k in PHASES)
        assert set(row["flops"]) == {"vision", "lm_prefill", "decode_per_token"}
        assert set(row["tflops_per_s"]) == {"vision", "prefill", "decode"}
        expected = row["flops"]["lm_prefill"] / (row["prefill_ms"] * 1e-3) / 1e12
        assert row["tflops_per_s"]["prefill"] == pytest.approx(expected, rel=1e-3, abs=1e-4)
        assert len(row["tokens"]) == NEW
        assert row["peak_memory_bytes"] is None  # CPU: no allocator statistics
        for ref in ("hf", "best_hf", "full"):
            assert set(row[f"speedup_vs_{ref}"]) == PHASES
    rows = {r["method"]: r for r in result["methods"]}
    assert rows["hf"]["speedup_vs_hf"]["prefill_ms"] == 1.0 and rows["full"]["speedup_vs_full"]["decode_ms"] == 1.0
    assert rows["hf"]["speedup_vs_best_hf"] == rows["hf"]["speedup_vs_hf"]  # the only transformers method here
    for row in result["methods"]:  # serving numbers follow from the measured times and bytes
        serve = row["serving"]
        assert serve["kv_cache_bytes_per_request"] * 2 == row["kv_cache_bytes"]  # batch 2
        assert serve["requests_in_memory_budget"] == 40 * 2**30 // serve["kv_cache_bytes_per_request"]
        assert serve["decode_tokens_per_s"] == pytest.approx(2e3 / row["decode_ms"], rel=1e-3)
        request_ms = row["ttft_ms"] + (NEW - 1) * row["decode_ms"]
        assert serve["requests_per_s"] == pytest.approx(2e3 / request_ms, rel=1e-2)
        assert serve["decode_vs_bound"] == pytest.approx(
            row["decode_ms"] / serve["decode_bound_ms"], rel=1e-2, abs=2e-3
        )
        expected = serve["decode_bytes_per_step"] / row["decode_ms"] * 1e-6
        assert serve["decode_gb_per_s"] == pytest.approx(expected, rel=1e-2, abs=2e-3)
    weights = {m: rows[m]["serving"]["decode_bytes_per_step"] - rows[m]["kv_cache_bytes"] for m in rows}
    assert weights["hf"] == weights["full"] < weights["visor:0"]  # VISOR also reads its CA modules
    assert result["config"]["copy_gb_per_s"] > 0
    ratio = rows["hf"]["prefill_ms"] / rows["visor:0"]["prefill_ms"]
    assert rows["visor:0"]["speedup_vs_hf"]["prefill_ms"] == pytest.approx(ratio, rel=1e-2)
    # our full forward is the base model: the same greedy tokens as transformers' own (float32)
    assert rows["full"]["same_tokens_as_hf"] is True and rows["visor:0"]["same_tokens_as_hf"] is None
    assert 0 <= rows["full"]["prefill_logits_diff_vs_hf"] <= 1e-5 and rows["hf"]["prefill_logits_diff_vs_hf"] == 0
    assert rows["visor:0"]["prefill_logits_diff_vs_hf"] is None
    # FLOPs: fewer SA layers, fewer FLOPs; hf and full do the same work; a batch of 2 counts twice
    assert rows["hf"]["flops"] == rows["full"]["flops"]
    one = count_flops(read_config(config), Schedule.default(6), "full", V, T)
    assert rows["full"]["flops"]["lm_prefill"] == 2 * one.lm_prefill
    assert rows["full"]["flops"]["vision"] == 2 * (one.prefill - one.lm_prefill)
    prefill = {m: rows[m]["flops"]["lm_prefill"] for m in rows}
    assert prefill["visor:0"] < prefill["visor:2"] < prefill["full"]


def test_kv_cache_bytes_match_a_count_by_hand(checkpoints):
    """transformers' cache holds every prompt token in every layer; ours preallocates the text
    for the prompt and the new tokens and keeps visual K/V only where a layer reads them."""
    config = checkpoints["llava-onevision"] / "config.json"
    cfg = BenchConfig(config=str(config), visual_tokens=V, text_tokens=T, new_tokens=NEW, methods="hf,full,visor:0")
    cfg.repeats, cfg.warmup = 1, 0
    rows = {r["method"]: r for r in run_bench(cfg)["methods"]}
    lm = LMConfig.from_hf(read_config(config).text_config)
    per_token = 2 * lm.n_kv_heads * lm.head_dim * 4  # K and V, float32
    assert rows["hf"]["kv_cache_bytes"] == lm.n_layers * per_token * (V + T)
    assert rows["full"]["kv_cache_bytes"] == lm.n_layers * per_token * (V + T + NEW)
    n_ca = 2  # default schedule of 6 layers: CA at layers 1 and 4; budget 0 runs no SA layer
    assert rows["visor:0"]["kv_cache_bytes"] == lm.n_layers * per_token * (T + NEW) + n_ca * per_token * V


def test_bench_errors(checkpoints):
    config = str(checkpoints["llava-onevision"] / "config.json")
    with pytest.raises(VisorError, match="unknown method"):
        run_bench(BenchConfig(config=config, methods="hf,fastest", visual_tokens=V, text_tokens=T))
    with pytest.raises(VisorError, match="budget"):
        run_bench(BenchConfig(config=config, methods="visor:9", visual_tokens=V, text_tokens=T))
    with pytest.raises(VisorError, match="no built-in shape for --arch llava-onevision --size 70b"):
        builtin_config("70b")
    with pytest.raises(VisorError, match="context"):
        run_bench(BenchConfig(config=config, visual_tokens=10**6, text_tokens=T))
    for prefill in ("graph", "compile-graph"):
        with pytest.raises(VisorError, match="needs a CUDA device"):
            run_bench(BenchConfig(config=config, visual_tokens=V, text_tokens=T, prefill=prefill))
    with pytest.raises(VisorError, match="unknown prefill mode 'fast'"):
        run_bench(BenchConfig(config=config, visual_tokens=V, text_tokens=T, prefill="fast"))


REAL = {  # (arch, size): (model type, LM layers, parameters in billions of the LM (lm_head apart) and the tower)
    ("llava-onevision", "0.5b"): ("llava_onevision", 24, 0.49, 0.40),
    ("llava-onevision", "7b"): ("llava_onevision", 28, 7.07, 0.40),  # Qwen2-7B: 7.61 with its untied lm_head
    ("qwen2-vl", "7b"): ("qwen2_vl", 28, 7.07, 0.68),
    ("qwen2.5-vl", "3b"): ("qwen2_5_vl", 36, 3.09, 0.67),
    ("qwen2.5-vl", "7b"): ("qwen2_5_vl", 28, 7.07, 0.68),
    ("qwen3-vl", "8b"): ("qwen3_vl", 36, 7.57, 0.58),  # 8.77 in all
    ("internvl", "8b"): ("internvl", 28, 7.07, 0.30),  # InternVL3-8B: InternViT-300M + Qwen2.5-7B
}


@pytest.mark.parametrize("arch, size", list(REAL))
def test_builtin_shapes_are_the_released_models(arch, size):
    """Each shipped config builds (on the meta device) the released model's parameter counts."""
    import torch
    import transformers

    from visor.backbone import ARCHITECTURES

    config = read_config(builtin_config(size, arch))
    model_type, layers, lm_billions, tower_billions = REAL[arch, size]
    assert config.model_type == model_type and config.text_config.num_hidden_layers == layers
    with torch.device("meta"):
        model = getattr(transformers, ARCHITECTURES[model_type])._from_config(config)
    count = lambda module: sum(p.numel() for p in module.parameters()) / 1e9  # noqa: E731
    tower = model.model.vision_tower if hasattr(model.model, "vision_tower") else model.model.visual
    assert count(model.model.language_model) == pytest.approx(lm_billions, rel=0.05)
    assert count(tower) == pytest.approx(tower_billions, rel=0.05)
    assert Schedule.default(layers).budgets  # the default schedule rule fits its depth


@pytest.mark.parametrize("arch", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "internvl"])
def test_bench_runs_a_dynamic_resolution_tower(checkpoints, arch):
    """Qwen-VL: the tower on one image of the visual-token count, FLOPs counted for that grid (InternVL:
    on the tiles that yield it); the full forward gives transformers' tokens."""
    config = str(checkpoints[arch] / "config.json")
    result = run_bench(BenchConfig(config=config, visual_tokens=V, text_tokens=T, new_tokens=NEW, repeats=1, warmup=0))
    rows = {r["method"]: r for r in result["methods"]}
    one = count_flops(read_config(config), Schedule.default(6), "full", V, T)
    assert rows["full"]["flops"]["vision"] == one.prefill - one.lm_prefill > 0
    assert rows["full"]["same_tokens_as_hf"] is True and rows["visor:2"]["vision_ms"] > 0


def test_hf_compile_is_transformers_static_cache_and_compiled_step(checkpoints):
    """hf-compile (transformers' documented fast path: StaticCache + torch.compile) gives the dynamic
    cache's greedy tokens and logits; its speed-ups are against the faster transformers path per phase."""
    config = str(checkpoints["llava-onevision"] / "config.json")
    cfg = BenchConfig(config=config, methods="hf,hf-compile,visor:1", visual_tokens=V, text_tokens=T, new_tokens=NEW)
    result = run_bench(dataclasses.replace(cfg, repeats=1, warmup=0))
    rows = {r["method"]: r for r in result["methods"]}
    assert rows["hf-compile"]["same_tokens_as_hf"] is True
    assert rows["hf-compile"]["prefill_logits_diff_vs_hf"] <= 1e-5
    assert rows["hf-compile"]["kv_cache_bytes"] >= rows["hf"]["kv_cache_bytes"]  # preallocated for every new token
    best = {k: min(rows["hf"][k], rows["hf-compile"][k]) for k in PHASES}
    assert rows["visor:1"]["speedup_vs_best_hf"]["decode_ms"] == pytest.approx(
        best["decode_ms"] / rows["visor:1"]["decode_ms"], rel=1e-2
    )
