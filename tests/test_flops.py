"""Analytic FLOPs against torch.utils.flop_counter on a run with explicit matmul attention."""

import pytest
import torch
from conftest import set_visor_weights
from torch.utils.flop_counter import FlopCounterMode

import visor
from visor.flops import count_flops, decode_flops
from visor.generate import collate

SCHEDULES = [
    None,
    "sa,sa,ca,text,ca,sa",
    {"roles": ["sa", "ca", "text", "sa", "ca", "text"], "position_encoding": "conv"},
]


def measured(fn):
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return counter.get_total_flops(), out


@pytest.fixture(scope="module", params=range(len(SCHEDULES)), ids=["default", "custom", "conv"])
def eager_model(request, checkpoints, arch):
    model = visor.load(checkpoints[arch], schedule=SCHEDULES[request.param], attn_implementation="eager")
    model.lm.explicit_attention = True  # SDPA hides attention from flop counters
    set_visor_weights(model)
    return model


@pytest.mark.parametrize("budget", [0, 1, 2, "full"])
@pytest.mark.parametrize("case", [("What is shown?", [1]), ("Which colour dominates in the picture, and why?", [0, 3])])
def test_prefill_and_decode_flops_match_the_counter(eager_model, images, budget, case):
    prompt, which = case
    with torch.no_grad():
        vision_flops, sample = measured(lambda: eager_model.backbone.encode(prompt, [images[i] for i in which]))
        tok = collate([sample], eager_model.backbone.image_token_id, "cpu")
        lm_flops, (logits, cache, *_) = measured(
            lambda: eager_model.lm.prefill(tok, budget, capacity=tok.text_ids.shape[1] + 4)
        )
        step_flops, _ = measured(lambda: eager_model.lm.decode_one_token(logits.argmax(-1), cache, cache.n_prompt))
    n_visual = sample.visual.shape[0]
    report = eager_model.flops(n_visual, len(sample.ids) - n_visual, budget, sample.n_crops, grids=sample.grids)
    assert report.prefill == pytest.approx(vision_flops + lm_flops, rel=0.01)
    vision = report.breakdown["prefill"]["vision_tower"] + report.breakdown["prefill"]["projector"]
    assert vision == pytest.approx(vision_flops, rel=0.01)
    assert report.decode_per_token == pytest.approx(step_flops, rel=0.01)


def test_decode_total_matches_the_counter(checkpoints, images):
    model = visor.load(checkpoints["llava-onevision"])
    model.lm.explicit_attention = True
    sample = model.backbone.encode("What is shown?", [images[0]])
    tok = collate([sample], model.backbone.image_token_id, "cpu")
    with torch.no_grad():
        logits, cache, *_ = model.lm.prefill(tok, 1, capacity=tok.text_ids.shape[1] + 8)
        with FlopCounterMode(display=False) as counter:
            for pos in range(cache.n_prompt, cache.n_prompt + 7):
                logits = model.lm.decode_one_token(logits.argmax(-1), cache, pos)
    n_visual = sample.visual.shape[0]
    expected = decode_flops(model.config, model.schedule, 1, n_visual, len(sample.ids) - n_visual, 8)
    assert expected == pytest.approx(counter.get_total_flops(), rel=0.01)


def test_budget_flops_grow_linearly(base_model):
    totals = [base_model.flops(2000, 64, k).prefill for k in range(3)]
    assert totals[1] - totals[0] == totals[2] - totals[1] > 0
    assert base_model.flops(2000, 64, "full").prefill > totals[-1]


def test_full_budget_costs_what_a_dense_model_costs(base_model):
    """Full = L layers over Nv + Nt tokens, no CA; independent brute-force count from the config."""
    c = base_model.config.text_config
    n, d, i, hd = 2000 + 64, c.hidden_size, c.intermediate_size, c.hidden_size // c.num_attention_heads
    per_layer = 2 * n * d * (2 * d + 2 * c.num_key_value_heads * hd) + 2 * n * 3 * d * i + 4 * n * n * d
    report = base_model.flops(2000, 64, "full")
    assert report.breakdown["prefill"]["lm_layers"] == c.num_hidden_layers * per_layer
    assert report.breakdown["prefill"]["cross_attention"] == 0
    assert report.breakdown["prefill"]["lm_head"] == 2 * d * c.vocab_size


def test_real_configs_without_weights():
    from visor.backbone import read_config

    for name in ["0.5b", "7b"]:
        config = read_config(f"visor/configs/llava-onevision-qwen2-{name}.json")
        schedule = visor.Schedule.default(config.text_config.num_hidden_layers)
        full = count_flops(config, schedule, "full", 7290, 64)
        two = count_flops(config, schedule, 2, 7290, 64)
        assert full.n_crops == 10 and full.lm_prefill / two.lm_prefill > 8
