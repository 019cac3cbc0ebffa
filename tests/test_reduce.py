"""Token-reduction baselines: exact at keep = 100%, choices equal brute force, FLOPs counted."""

import math

import pytest
import torch
from conftest import set_visor_weights
from torch.utils.flop_counter import FlopCounterMode

import visor
from visor.generate import collate
from visor.reduce import Reduction, visionzip_select

PROMPT = "What is shown in this picture?"


def prefill_logits(model, images, budget="full", reduction=None):
    """Logits of the last prompt token, the sample, its tokens, and the visual tokens each drop layer kept."""
    sample = model.encode([PROMPT], [images], reduction)[0]
    tok = collate([sample], model.backbone.image_token_id, "cpu")
    drops = reduction.drops(model.lm.cfg.n_layers) if reduction else None
    with torch.no_grad():
        out = model.lm.run(tok, [budget], None, drops)
    return model.lm.logits(out.text[0, -1]), sample, tok, out.kept


@pytest.mark.parametrize(
    "reduction",
    [
        Reduction("fastv", layer=2, keep=1.0),
        Reduction("pdrop", stages=[1, 3, 5], ratio=1.0),
        Reduction("visionzip", dominant=10_000, contextual=0),
    ],
    ids=["fastv", "pdrop", "visionzip"],
)
def test_keeping_everything_is_the_base_model(base_model, images, reduction):
    base, *_ = prefill_logits(base_model, [images[1]])
    reduced, *_ = prefill_logits(base_model, [images[1]], reduction=reduction)
    assert torch.equal(base, reduced)
    g = base_model.generate(images[1], PROMPT, max_new_tokens=6)
    assert base_model.generate(images[1], PROMPT, max_new_tokens=6, reduction=reduction).token_ids == g.token_ids


@pytest.fixture(scope="module")
def eager_base(checkpoints, arch):
    return visor.load(checkpoints[arch], attn_implementation="eager")


@pytest.mark.parametrize("layer, keep", [(1, 0.5), (2, 0.25), (4, 0.1)])
def test_fastv_keeps_what_the_attention_matrix_says(eager_base, images, layer, keep):
    """Brute force: HF's own attention probabilities (eager), last token's row, head mean, top-k."""
    _, sample, tok, kept = prefill_logits(eager_base, [images[3]], reduction=Reduction("fastv", layer=layer, keep=keep))
    ids = torch.tensor([sample.ids])
    embeds = eager_base.lm.embed_tokens(ids)
    is_image = ids[0] == eager_base.backbone.image_token_id
    embeds[0, is_image] = sample.visual
    with torch.no_grad():
        out = eager_base.backbone.hf.model.language_model(inputs_embeds=embeds, output_attentions=True)
    row = out.attentions[layer - 1][0, :, -1, :].mean(0)  # (S,) the last token's attention
    visual_scores = row[is_image]
    n_keep = math.ceil(keep * len(visual_scores))
    expected = sorted(visual_scores.topk(n_keep).indices.tolist())
    assert kept[layer - 1][0] == expected


def test_pyramid_drop_stages(eager_base, images):
    pdrop = Reduction("pdrop", stages=[2, 3, 5], ratio=0.5)
    kept = prefill_logits(eager_base, [images[3]], reduction=pdrop)[3]
    fastv = prefill_logits(eager_base, [images[3]], reduction=Reduction("fastv", layer=2, keep=0.5))[3]
    assert kept[1] == fastv[1]  # the first stage is FastV
    sizes = [len(kept[i][0]) for i in (1, 2, 4)]
    n_visual = eager_base.encode([PROMPT], [[images[3]]])[0].visual.shape[0]
    assert sizes == [
        math.ceil(n_visual / 2),
        math.ceil(math.ceil(n_visual / 2) / 2),
        math.ceil(math.ceil(math.ceil(n_visual / 2) / 2) / 2),
    ]
    assert all(0 <= i < prev for i, prev in zip(kept[2][0], [sizes[0]] * sizes[1]))


def test_visionzip_selection_on_a_hand_made_example():
    tokens = torch.arange(8, dtype=torch.float32)[:, None].repeat(1, 2)  # token i = (i, i)
    scores = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.0, 0.3, 0.05, 0.7])
    keys = torch.tensor([[1, 0], [0, 1], [1, -0.1], [0, 1], [0.1, 1], [1, 0], [0.9, 0.1], [0, 1]], dtype=torch.float32)
    out, dominant = visionzip_select(tokens, scores, keys, dominant=3, contextual=2)
    assert dominant.tolist() == [1, 3, 7]  # the three most attended, in original order
    # remaining 0, 2, 4, 5, 6 -> targets 0 and 6 (evenly spaced); cos(2, 0) = .995 > cos(2, 6) = .978; cos(5, 0) = 1
    # closer to 6? cos(4, 0) = 0.0995, cos(4, 6) = 0.2095 -> 6.  groups {0, 2, 5}, {4, 6}
    assert out.shape == (5, 2)
    assert torch.allclose(out[:3], tokens[[1, 3, 7]])
    assert torch.allclose(out[3], torch.tensor([(0 + 2 + 5) / 3] * 2))
    assert torch.allclose(out[4], torch.tensor([(4 + 6) / 2] * 2))


def test_visionzip_token_counts(base_model, images):
    zip_ = Reduction("visionzip", dominant=6, contextual=2)
    sample = base_model.encode([PROMPT], [[images[1]]], zip_)[0]
    assert sample.visual.shape[0] == sample.n_crops * 8
    two = base_model.encode([PROMPT], [[images[0], images[2]]], zip_)[0]
    assert two.visual.shape[0] == 2 * 8  # several images: one crop each


@pytest.mark.parametrize(
    "budget, reduction",
    [
        ("full", Reduction("fastv", layer=2, keep=0.3)),
        ("full", Reduction("pdrop", stages=[1, 3, 5], ratio=0.5)),
        ("full", Reduction("visionzip", dominant=6, contextual=3)),
        (1, Reduction("fastv", layer=2, keep=0.3)),
        (2, Reduction("visionzip", dominant=5, contextual=2)),
    ],
    ids=["fastv", "pdrop", "visionzip", "visor+fastv", "visor+visionzip"],
)
def test_reduction_flops_match_the_counter(checkpoints, arch, images, budget, reduction):
    model = visor.load(checkpoints[arch], attn_implementation="eager")
    model.lm.explicit_attention = True
    set_visor_weights(model)
    drops = reduction.drops(model.lm.cfg.n_layers)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        sample = model.encode([PROMPT], [[images[1]]], reduction)[0]
        tok = collate([sample], model.backbone.image_token_id, "cpu")
        logits, cache, *_ = model.lm.prefill(tok, budget, capacity=tok.text_ids.shape[1] + 2, drops=drops)
    with torch.no_grad(), FlopCounterMode(display=False) as step:
        model.lm.decode_one_token(logits.argmax(-1), cache, cache.n_prompt)
    n_visual = sample.visual.shape[0]
    report = model.flops(n_visual, len(sample.ids) - n_visual, budget, sample.n_crops, reduction)
    assert report.prefill == pytest.approx(counter.get_total_flops(), rel=0.01)
    assert report.decode_per_token == pytest.approx(step.get_total_flops(), rel=0.01)
    plain = model.encode([PROMPT], [[images[1]]])[0]
    full = model.flops(plain.visual.shape[0], len(plain.ids) - plain.visual.shape[0], "full", plain.n_crops)
    assert report.lm_prefill < full.lm_prefill
