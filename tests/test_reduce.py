"""Token-reduction baselines: exact at keep = 100%, choices equal brute force, FLOPs counted."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import set_visor_weights
from torch.utils.flop_counter import FlopCounterMode

import visor
from visor.backbone import MROPE, load_image
from visor.generate import collate
from visor.reduce import Reduction, visionzip_select, visionzip_serves_plain

PROMPT = "What is shown in this picture?"


def refuses(model, reduction, images) -> bool:
    """PyramidDrop (it renumbers 1-D positions) and VisionZip (fixed-size crops) are not defined for
    Qwen-VL (M-RoPE, a dynamic-resolution tower), nor VisionZip for InternVL (its projector shuffles
    2 x 2 patches into one token): the model refuses them, with a message saying why."""
    refused = {"pdrop": MROPE, "visionzip": (*MROPE, "internvl")}  # InternVL: a pixel-shuffle projector
    if model.backbone.config.model_type not in refused.get(reduction.method, ()):
        return False
    with pytest.raises(visor.ConfigError, match="M-RoPE|dynamic-resolution|DeepStack|pixel-shuffle"):
        prefill_logits(model, images, reduction=reduction)
    return True


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
    if refuses(base_model, reduction, [images[1]]):
        return
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
    """Brute force: HF's own attention probabilities (eager), last token's row, head mean, top-k.
    (Qwen3-VL: dropping before DeepStack's last layer is refused.)"""
    fastv = Reduction("fastv", layer=layer, keep=keep)
    if layer < len(getattr(eager_base.config.vision_config, "deepstack_visual_indexes", None) or []):
        with pytest.raises(visor.ConfigError, match="DeepStack adds visual features up to layer 1"):
            prefill_logits(eager_base, [images[3]], reduction=fastv)
        return
    _, sample, tok, kept = prefill_logits(eager_base, [images[3]], reduction=fastv)
    ids = torch.tensor([sample.ids])
    embeds = eager_base.lm.embed_tokens(ids)
    is_image = ids[0] == eager_base.backbone.image_token_id
    embeds[0, is_image] = sample.visual
    extra = {} if sample.positions is None else {"position_ids": sample.positions.T[:, None]}  # M-RoPE
    if sample.deepstack is not None:  # Qwen3-VL adds its tower's intermediate features in the first layers
        extra |= {"visual_pos_masks": is_image[None], "deepstack_visual_embeds": list(sample.deepstack)}
    with torch.no_grad():
        out = eager_base.backbone.hf.model.language_model(inputs_embeds=embeds, output_attentions=True, **extra)
    row = out.attentions[layer - 1][0, :, -1, :].mean(0)  # (S,) the last token's attention
    visual_scores = row[is_image]
    n_keep = int(keep * len(visual_scores))  # the official KV-cache code: int(576 * ratio)
    expected = sorted(visual_scores.topk(n_keep).indices.tolist())
    assert kept[layer - 1][0] == expected


def official_pyramid_drop(model, ids, visual, query: int, stages: list[int], ratio: float):
    """A port of PyramidDrop's own inference code (Cooperx521/PyramidDrop, modeling_llama_pdrop.py) over
    HF's modules, for one sample: after ``stages[s]`` layers, the next layer's input_layernorm and
    q_proj/k_proj on the output, RoPE at positions 0..L-1, the query token's fp32 softmax over the
    causal keys, head mean, the image keys' top int(N x ratio^(s+1)), sorted; the sequence gathered
    and its positions renumbered 0..L'-1. ``query``: the last prompt token (tokens after it are
    generated ones: decode positions continue from each stage's shortened length, as there).
    Returns the logits of every position (L', V) and each stage's kept indices."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb, repeat_kv

    lm = model.backbone.hf.model.language_model
    ids = torch.tensor(ids)
    is_image = ids == model.backbone.image_token_id
    h = model.lm.embed_tokens(ids)[None]
    h[0, is_image] = visual
    start, n_image, n_original = int(is_image.nonzero()[0]), int(is_image.sum()), int(is_image.sum())
    kept = {}
    for idx, layer in enumerate(lm.layers):
        positions = torch.arange(h.shape[1])[None]
        causal = torch.full((h.shape[1], h.shape[1]), float("-inf")).triu(1)[None, None]
        h = layer(h, attention_mask=causal, position_ids=positions, position_embeddings=lm.rotary_emb(h, positions))
        h = h[0] if isinstance(h, tuple) else h
        if idx + 1 not in stages:
            continue
        attn = lm.layers[idx + 1].self_attn
        x = lm.layers[idx + 1].input_layernorm(h)
        shape = (1, h.shape[1], -1, attn.head_dim)
        q, k = (p(x).view(shape).transpose(1, 2) for p in (attn.q_proj, attn.k_proj))
        q, k = apply_rotary_pos_emb(q, k, *lm.rotary_emb(x, positions))
        k = repeat_kv(k, q.shape[1] // k.shape[1])  # the official code has no GQA: each head its K
        scores = (q[:, :, query : query + 1] @ k.transpose(-1, -2)) / math.sqrt(attn.head_dim)
        scores[..., query + 1 :] = float("-inf")  # causal
        probs = scores.softmax(-1, dtype=torch.float32).mean(1)[0, 0]
        n_keep = int(n_original * ratio ** (stages.index(idx + 1) + 1))
        top = probs[start : start + n_image].topk(n_keep).indices.sort().values
        kept[idx] = top.tolist()
        keep = torch.cat([torch.arange(start), top + start, torch.arange(start + n_image, h.shape[1])])
        h, query, n_image = h[:, keep], query - (n_image - n_keep), n_keep
    return model.lm.lm_head(lm.norm(h))[0], kept


def test_pyramid_drop_is_the_official_rule(eager_base, images):
    """Kept tokens at every stage, the prefill's logits and the logits of 5 decode steps (cached, with
    the shifted positions) equal the port of the official code run over the whole sequence."""
    from conftest import greedy

    pdrop = Reduction("pdrop", stages=[2, 3, 5], ratio=0.5)
    if refuses(eager_base, pdrop, [images[3]]):
        return
    logits, sample, tok, kept = prefill_logits(eager_base, [images[3]], reduction=pdrop)
    drops = pdrop.drops(eager_base.lm.cfg.n_layers)
    with torch.no_grad():
        tokens, steps = greedy(eager_base, [sample], 6, "full", drops=drops)
        query = len(sample.ids) - 1
        ids = sample.ids + tokens[0, :-1].tolist()
        reference, official_kept = official_pyramid_drop(eager_base, ids, sample.visual, query, [2, 3, 5], 0.5)
    n_visual = sample.visual.shape[0]
    assert [len(kept[i][0]) for i in (1, 2, 4)] == [n_visual // 2, n_visual // 4, n_visual // 8] != [0, 0, 0]
    assert {i: k[0] for i, k in kept.items()} == official_kept
    n_prompt = reference.shape[0] - 5  # the prompt's tokens left after the drops
    assert (steps[0] - reference[n_prompt - 1 :]).abs().max() <= 1e-4


def test_visionzip_selection_on_a_hand_made_example():
    tokens = torch.arange(8, dtype=torch.float32)[:, None].repeat(1, 2)  # token i = (i, i)
    scores = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.0, 0.3, 0.05, 0.7])
    keys = torch.tensor([[1, 0], [0, 1], [1, -0.1], [0, 1], [0.1, 1], [1, 0], [0.9, 0.1], [0, 1]], dtype=torch.float32)
    out, dominant = visionzip_select(tokens, scores, keys, dominant=3, contextual=2)
    assert dominant.tolist() == [1, 3, 7]  # the three most attended, in original order
    # the rest 0, 2, 4, 5, 6: targets at 0 and 5 // 2 = 2 of them -> tokens 0 and 4; 2, 5, 6 join 0 (cosine
    # .995, 1, .994 against 0, .209 at most against 4): contextual = target + mean of what joined it
    assert out.shape == (5, 2)
    assert torch.allclose(out[:3], tokens[[1, 3, 7]])
    assert torch.allclose(out[3], torch.tensor([0 + (2 + 5 + 6) / 3] * 2))
    assert torch.allclose(out[4], torch.tensor([4.0, 4.0]))  # nothing joined it


@pytest.mark.parametrize("n_fixed, contextual", [(0, 3), (1, 2), (0, 0)])
def test_visionzip_on_a_batch_of_crops_is_each_crop_alone(n_fixed, contextual):
    gen = torch.Generator().manual_seed(0)
    tokens, scores, keys = torch.randn(5, 26, 3, generator=gen), torch.rand(5, 26, generator=gen), torch.randn(5, 26, 4)
    out, dominant = visionzip_select(tokens, scores, keys, 6, contextual, n_fixed)
    for c in range(5):
        alone, kept = visionzip_select(tokens[c], scores[c], keys[c], 6, contextual, n_fixed)
        assert torch.equal(dominant[c], kept) and torch.allclose(out[c], alone, atol=1e-6)
        assert kept[:n_fixed].tolist() == list(range(n_fixed)) and kept.tolist() == sorted(kept.tolist())
        assert torch.allclose(out[c, :6], tokens[c, kept])  # the dominant tokens: the best scored of the others
        best = scores[c, n_fixed:].topk(6 - n_fixed).values
        assert torch.equal(scores[c, kept[n_fixed:]].sort().values, best.sort().values)


def test_visionzip_means_hold_in_bfloat16():
    """598 tokens joining one target: their mean, summed and counted in float32 (bfloat16 alone stops
    counting at 256), as in float32 up to bfloat16's rounding."""
    gen = torch.Generator().manual_seed(0)
    tokens, keys = torch.rand(1, 600, 4, generator=gen), torch.ones(1, 600, 2)  # one key: every token joins
    scores = torch.rand(1, 600, generator=gen)
    exact, _ = visionzip_select(tokens, scores, keys, 1, 1)
    half, _ = visionzip_select(tokens.bfloat16(), scores, keys, 1, 1)
    torch.testing.assert_close(half.float(), exact, atol=1e-2, rtol=1e-2)


def official_visionzip(hidden, attn, metric, dominant, contextual):
    """A port of VisionZip's own code (dvlab-research/VisionZip, visionzip/clip_encoder.py), one CLIP
    crop: hidden (1, N, C) with CLS first, attn (1, H, N, N), metric (1, N, dk) the keys, head mean."""
    dominant_num, contextual_num = dominant - 1, contextual
    cls_attention_sum = attn[:, :, 0, 1:].sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros((1, 1), dtype=topk_indices.dtype), topk_indices], dim=1)
    mask = torch.ones_like(hidden[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden.masked_select(~mask.unsqueeze(-1)).view(1, dominant_num + 1, hidden.shape[2])
    metric_filtered = metric[mask].view(1, hidden.shape[1] - (dominant_num + 1), metric.shape[2])
    hidden_filtered = hidden.masked_select(mask.unsqueeze(-1)).view(1, hidden.shape[1] - (dominant_num + 1), -1)
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    merge = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    tokens_to_merge = metric_normalized[:, merge, :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(1, tokens_to_merge.shape[1], contextual_num, dtype=hidden.dtype)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_filtered[:, merge, :]) / counts
    contextual_tokens = hidden_filtered[:, target_indices, :] + aggregated_hidden
    return torch.cat([dominant_tokens, contextual_tokens], dim=1)[0]


@pytest.mark.parametrize("dominant, contextual", [(5, 3), (9, 4), (2, 7)])
def test_visionzip_is_the_official_rule(dominant, contextual):
    """Against the port of the official code on random crops: CLS kept among the dominant tokens."""
    gen = torch.Generator().manual_seed(dominant)
    hidden = torch.randn(1, 26, 6, generator=gen)  # CLS + 25 patches
    attn = torch.randn(1, 3, 26, 26, generator=gen).softmax(-1)
    metric = torch.randn(1, 26, 4, generator=gen)
    expected = official_visionzip(hidden, attn, metric, dominant, contextual)
    scores = torch.cat([torch.zeros(1), attn[0, :, 0, 1:].mean(0)])
    got, kept = visionzip_select(hidden[0], scores, metric[0], dominant, contextual, n_fixed=1)
    assert kept[0] == 0 and len(kept) == dominant
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("n_fixed", [1, 0])  # CLIP (a CLS token kept), SigLIP (none)
def test_visionzip_anyres_layout_is_the_official_one(n_fixed):
    """An AnyRes image: base crop, then the other crops' dominant patches in raster order over the
    stitched grid (as the official adapter's canvas puts them), their CLS tokens, their contextual ones."""
    from visor.reduce import _anyres_layout

    side, grid = 3, (2, 2)
    gen = torch.Generator().manual_seed(0)
    crops, dominant = [torch.full((4 + n_fixed, 1), -1.0)], [torch.arange(3 + n_fixed)]  # the base crop, as it is
    canvas = torch.full((grid[0] * side, grid[1] * side), float("nan"))
    for c in range(4):
        patches = torch.randperm(side * side, generator=gen)[:3].sort().values
        dominant.append(torch.cat([torch.zeros(n_fixed, dtype=torch.long), patches + n_fixed]))
        values = 100 * (c + 1) + patches.float()  # a patch's value names it
        cls = torch.tensor([[-(c + 2.0)]])[:n_fixed]
        crops.append(torch.cat([cls, values[:, None], torch.tensor([[1000.0 + c]])]))
        r, col = c // grid[1], c % grid[1]
        block = torch.full((side * side,), float("nan"))
        block[patches] = values  # the crop's 3 x 3 patches, then pasted into its place on the canvas
        canvas[r * side : (r + 1) * side, col * side : (col + 1) * side] = block.view(side, side)
    out = _anyres_layout(torch.stack(crops), dominant, grid, side * side, n_fixed)[:, 0]  # (crops, tokens, width)
    raster = canvas.flatten()[~canvas.flatten().isnan()]
    fixed = torch.tensor([-2.0, -3, -4, -5])[: 4 * n_fixed]
    expected = torch.cat([crops[0][:, 0], raster, fixed, torch.tensor([1000.0, 1001, 1002, 1003])])
    assert torch.equal(out, expected)


def test_visionzip_token_counts(base_model, images):
    """n + m tokens per crop (CLIP: the CLS token among the n); a one-crop image of LLaVA-OneVision
    ends with its newline token, an AnyRes one has none (the official adapter drops them)."""
    zip_ = Reduction("visionzip", dominant=6, contextual=2)
    if refuses(base_model, zip_, [images[1]]):
        return
    newline = int(base_model.config.model_type == "llava_onevision")
    sample = base_model.encode([PROMPT], [[images[1]]], zip_)[0]
    assert sample.visual.shape[0] == sample.n_crops * 8 + (newline if sample.n_crops == 1 else 0)
    two = base_model.encode([PROMPT], [[images[0], images[2]]], zip_)[0]
    assert two.visual.shape[0] == 2 * (8 + newline)  # several images: one crop each


@pytest.mark.parametrize(
    "reduction", [Reduction("fastv", layer=2, keep=0.25), Reduction("pdrop", stages=[2, 3, 5], ratio=0.5)]
)
def test_training_ranks_with_the_token_before_the_answer(eager_base, images, reduction):
    """Training with a token drop (``answer_token_losses``) ranks the visual tokens with the attention of
    the token before the answer, as PyramidDrop's training code does — where the prompt ends at inference,
    not the sample's last token, which has read the answer. Taught the model's own greedy answer, its
    losses are the cross-entropies of inference's decode steps (prefill, drops, cached decode); for
    PyramidDrop also the port of the official rule's, run over the conversation with that query. Ranked by
    the last token instead, the official rule keeps other tokens here: the test tells the two apart."""
    from conftest import greedy

    from visor.train import answer_token_losses

    if refuses(eager_base, reduction, [images[3]]) or eager_base.backbone.config.model_type in MROPE:
        return  # (FastV on Qwen-VL: the positions of a generated answer are the decoder's, not expand's)
    bb, n_new = eager_base.backbone, 4
    drops = reduction.drops(eager_base.lm.cfg.n_layers)
    _, sample, _, _ = prefill_logits(eager_base, [images[3]], reduction=reduction)
    with torch.no_grad():
        tokens, steps = greedy(eager_base, [sample], n_new, "full", drops=drops)
        answer = tokens[0].tolist()
        ids = bb.tokenizer(bb.prompt_text(PROMPT, 1))["input_ids"] + answer  # one placeholder for the image
        labels = [False] * (len(ids) - n_new) + [True] * n_new
        losses, _, (trained,) = answer_token_losses(bb, eager_base.lm, [(ids, labels, [load_image(images[3])])],
                                                    "full", reduction)  # fmt: skip
    assert trained.ids == sample.ids + answer
    expected = F.cross_entropy(steps[0], tokens[0], reduction="none")
    assert (losses - expected).abs().max() <= 1e-4
    if reduction.method != "pdrop":
        return
    query = len(sample.ids) - 1  # the token before the answer
    with torch.no_grad():
        logits, kept = official_pyramid_drop(eager_base, trained.ids, trained.visual, query, [2, 3, 5], 0.5)
        _, kept_by_last = official_pyramid_drop(eager_base, trained.ids, trained.visual, len(trained.ids) - 1,
                                                [2, 3, 5], 0.5)  # fmt: skip
    official = F.cross_entropy(logits[-n_new - 1 : -1], tokens[0], reduction="none")
    assert (losses - official).abs().max() <= 1e-4
    assert kept_by_last != kept


@pytest.mark.parametrize("visionzip", [None, (6, 2)], ids=["plain", "visionzip"])
def test_a_batch_is_encoded_as_each_sample_alone(base_model, images, visionzip):
    """Passes of the vision path over a batch (AnyRes images, several images, none; more images than
    one pass takes) give each sample the tokens it gets alone; a batch without images encodes too."""
    from visor.backbone import IMAGES_PER_PASS

    if visionzip and refuses(base_model, Reduction("visionzip", dominant=6, contextual=2), [images[1]]):
        return
    bb = base_model.backbone
    lists = [[images[0]], [], [images[1], images[2]], [images[3]]] + [
        [images[i % 4], images[3 - i % 4]] for i in range(4)
    ]
    assert sum(map(len, lists)) > IMAGES_PER_PASS
    prompts = [PROMPT, "Hi"] + [PROMPT] * (len(lists) - 2)
    assert bb.encode_batch(["Hi"], [[]], visionzip)[0].ids == bb.encode("Hi", []).ids
    together = bb.encode_batch(prompts, lists, visionzip)
    for prompt, pictures, got in zip(prompts, lists, together):
        alone = bb.encode(prompt, pictures, visionzip)
        assert got.ids == alone.ids and got.n_crops == alone.n_crops
        torch.testing.assert_close(got.visual, alone.visual, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("visionzip", [None, (6, 2)], ids=["plain", "visionzip"])
def test_kept_tower_outputs_give_what_the_whole_vision_path_gives(base_model, images, visionzip):
    """What training keeps of the tower (``tower_batch``, --cache-vision), each sample's kept from its
    own step, gives in a batch, through the rest of the vision path, the features the whole path gives
    the batch: AnyRes images, several images, none."""
    from visor.backbone import TOWERED, load_image

    bb = base_model.backbone
    lists = [[load_image(images[i]) for i in ids] for ids in ([0], [], [1, 2], [3])]
    if bb.config.model_type not in TOWERED:
        with pytest.raises(visor.ConfigError, match="only llava, llava_onevision"):
            bb.tower_batch(lists)
        return
    with torch.no_grad():
        kept = [bb.tower_batch([own], visionzip is not None)[0] for own in lists]  # scored: VisionZip's part
        assert kept[1] is None and [sum(t.patches) for t in kept if t] == [t.tokens.shape[0] for t in kept if t]
        assert all((t.scores is not None) == (visionzip is not None) for t in kept if t)
        whole, through = bb.image_features_batch(lists, visionzip), bb.image_features_batch(lists, visionzip, kept)
        if visionzip is not None and not visionzip_serves_plain(bb.config):  # LLaVA: its layer, CLS included
            with pytest.raises(visor.ConfigError, match="not this model's plain path's"):
                bb.image_features_batch(lists, None, kept)
    for w, t in zip(whole, through):
        assert w.n_crops == t.n_crops and len(w.features) == len(t.features)
        for a, b in zip(w.features, t.features):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


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
    if refuses(model, reduction, [images[1]]):
        return
    drops = reduction.drops(model.lm.cfg.n_layers)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        sample = model.encode([PROMPT], [[images[1]]], reduction)[0]
        tok = collate([sample], model.backbone.image_token_id, "cpu")
        logits, cache, *_ = model.lm.prefill(tok, budget, capacity=tok.text_ids.shape[1] + 2, drops=drops)
    with torch.no_grad(), FlopCounterMode(display=False) as step:
        model.lm.decode_one_token(logits.argmax(-1), cache, cache.n_prompt)
    n_visual = sample.visual.shape[0]
    report = model.flops(n_visual, len(sample.ids) - n_visual, budget, sample.n_crops, reduction, sample.grids)
    assert report.prefill == pytest.approx(counter.get_total_flops(), rel=0.01)
    assert report.decode_per_token == pytest.approx(step.get_total_flops(), rel=0.01)
    plain = model.encode([PROMPT], [[images[1]]])[0]
    n_plain = plain.visual.shape[0]
    full = model.flops(n_plain, len(plain.ids) - n_plain, "full", plain.n_crops, grids=plain.grids)
    assert report.lm_prefill < full.lm_prefill
