"""Exact FLOP accounting of a VISOR forward, per component, for prefill and per decode token.

Units: FLOPs of the matrix multiplications our forward performs (projections, attention scores
and values, MLPs, convolutions, lm_head), a multiply-add counting 2, for one sample (batch 1).
Element-wise work (norms, RoPE, softmax, activations) is not counted: it is well under 1% and
``torch.utils.flop_counter`` does not count it either. Attention is counted over every
(query, key) pair the kernel sees, masked or not, as an explicit-matmul forward computes it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from . import checks
from .model import LMConfig
from .reduce import visionzip_of
from .schedule import Budget, Schedule


def _linear(n_tokens: int, d_in: int, d_out: int) -> int:
    return 2 * n_tokens * d_in * d_out


def _attention(n_queries: int, n_keys: int, n_heads: int, head_dim: int) -> int:
    return 2 * 2 * n_queries * n_keys * n_heads * head_dim  # scores (QK^T) and values (AV)


@dataclass
class LMCost:
    cfg: LMConfig

    def projections(self, n: int) -> int:  # q, k, v, o of one layer over n tokens
        c = self.cfg
        q_out, kv_out = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        return _linear(n, c.hidden, q_out) * 2 + _linear(n, c.hidden, kv_out) * 2

    def mlp(self, n: int) -> int:
        return 3 * _linear(n, self.cfg.hidden, self.cfg.intermediate)

    def layer(self, n_queries: int, n_keys: int) -> int:
        """A decoder layer on n_queries new tokens attending over n_keys keys."""
        c = self.cfg
        return self.projections(n_queries) + self.mlp(n_queries) + _attention(n_queries, n_keys, c.n_heads, c.head_dim)

    def cross(self, n_text: int, n_visual: int, with_kv: bool) -> int:
        c = self.cfg
        q_out, kv_out = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        flops = 2 * _linear(n_text, c.hidden, q_out) + _attention(n_text, n_visual, c.n_heads, c.head_dim)
        return flops + (2 * _linear(n_visual, c.hidden, kv_out) if with_kv else 0)

    def lm_head(self, n: int = 1) -> int:
        return _linear(n, self.cfg.hidden, self.cfg.vocab)


def vision_flops_per_crop(vision_config) -> tuple[int, int]:
    """(FLOPs of the vision tower on one crop, tokens per crop handed to the projector)."""
    v = vision_config
    side = lambda x: x if isinstance(x, int) else x[0]  # noqa: E731 - InternViT gives [height, width]
    n_patches = (side(v.image_size) // side(v.patch_size)) ** 2
    has_cls = v.model_type.startswith("clip") or v.model_type == "internvl_vision"
    n = n_patches + has_cls
    d, i = v.hidden_size, v.intermediate_size
    flops = _linear(n_patches, v.num_channels * side(v.patch_size) ** 2, d)  # patch embedding (a strided conv)
    per_layer = _linear(n, d, d) * 4 + _attention(n, n, 1, d) + _linear(n, d, i) * 2
    flops += v.num_hidden_layers * per_layer
    if getattr(v, "vision_use_head", False):  # SigLIP attention-pooling head: one probe query
        flops += _linear(1, d, d) * 2 + _linear(n, d, d) * 2 + _attention(1, n, 1, d) + _linear(1, d, i) * 2
    return flops, n


DYNAMIC = ("qwen2_vl_vision", "qwen2_5_vl_vision", "qwen3_vl_vision")  # each image at its own resolution


def square_grid(n_visual: int, merge: int) -> list[tuple[int, int, int]]:
    """One image of n_visual merged tokens, as square as its count allows: its (t, h, w) patch grid."""
    if n_visual == 0:
        return []
    rows = max(r for r in range(1, math.isqrt(n_visual) + 1) if n_visual % r == 0)
    return [(1, rows * merge, n_visual // rows * merge)]


def dynamic_vision_flops(v, grids: list[tuple[int, int, int]]) -> tuple[int, int]:
    """(tower, projector) FLOPs of a dynamic-resolution tower (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) on
    images of these (t, h, w) patch grids: patch embedding, blocks attending within each frame
    (Qwen2.5-VL: within windows of ``window_size`` pixels, but in its full-attention blocks), the
    patch merger (Qwen3-VL: and one per DeepStack level)."""
    merge = v.spatial_merge_size
    windowed, qwen2 = v.model_type == "qwen2_5_vl_vision", v.model_type == "qwen2_vl_vision"
    d = v.embed_dim if qwen2 else v.hidden_size
    n = sum(t * h * w for t, h, w in grids)
    tower = _linear(n, v.in_channels * v.temporal_patch_size * v.patch_size**2, d)  # a Conv3d over the patches
    if qwen2:
        mlp = 2 * _linear(n, d, d * v.mlp_ratio)
    else:  # Qwen2.5-VL's is gated (3 projections), Qwen3-VL's is not
        mlp = (3 if windowed else 2) * _linear(n, d, v.intermediate_size)
    full = sum(t * _attention(h * w, h * w, 1, d) for t, h, w in grids)  # per frame; heads share d
    side = v.window_size // merge // v.patch_size if windowed else 0  # window side, in merged tokens
    windows = 0
    for t, h, w in grids if windowed else []:
        rows = [min(side, h // merge - i) * merge for i in range(0, h // merge, side)]
        cols = [min(side, w // merge - j) * merge for j in range(0, w // merge, side)]
        windows += t * sum(_attention(r * c, r * c, 1, d) for r in rows for c in cols)
    for block in range(v.depth):
        attention = windows if windowed and block not in v.fullatt_block_indexes else full
        tower += _linear(n, d, 3 * d) + _linear(n, d, d) + attention + mlp
    merged = n // merge**2
    projector = _linear(merged, d * merge**2, d * merge**2)
    projector += _linear(merged, d * merge**2, v.hidden_size if qwen2 else v.out_hidden_size)
    return tower, projector * (1 + len(getattr(v, "deepstack_visual_indexes", None) or []))


@dataclass
class FlopReport:
    budget: Budget
    n_visual: int
    n_text: int
    n_crops: int
    prefill: int = 0
    lm_prefill: int = 0  # prefill without the vision tower and projector: the language model's share
    decode_per_token: int = 0  # the first new token, attending over the whole prompt
    breakdown: dict = field(default_factory=dict)  # {"prefill": {...}, "decode_per_token": {...}}
    layers: list = field(default_factory=list)  # [{"index", "role", "prefill", "decode_per_token"}]

    def to_dict(self) -> dict:
        return asdict(self)


def count_flops(
    hf_config,
    schedule: Schedule,
    budget: Budget,
    n_visual: int,
    n_text: int,
    n_crops: int | None = None,
    reduction=None,
    grids: list[tuple[int, int, int]] | None = None,
    router: dict | None = None,
) -> FlopReport:
    """FLOPs of one sample with n_visual image tokens entering the language model (after
    VisionZip, if used) and n_text text tokens at this budget; ``reduction``: a visor.reduce.Reduction.
    A dynamic-resolution tower (Qwen-VL) is counted on the images' patch ``grids`` (default: one image
    of n_visual tokens, as square as possible). ``router``: the config of the policy that chose the
    budget ("auto"); its MLP is counted too, and its probe (``probe_layers`` layers at budget 0) where
    that is not the start of the prefill (``Schedule.shares_probe``)."""
    checks.count("visual tokens", n_visual)
    checks.count("text tokens", n_text, 1)
    if n_crops is not None:
        checks.count("crops", n_crops)
    cfg = LMConfig.from_hf(hf_config.text_config)
    schedule.check_depth(cfg.n_layers)
    budget = schedule.parse_budget(budget)
    lm = LMCost(cfg)
    vision = hf_config.vision_config
    zip_ = visionzip_of(reduction)
    if reduction is not None:
        reduction.check(hf_config)  # a reduction the family does not define is refused, not counted
    if vision.model_type in DYNAMIC:
        grids = square_grid(n_visual, vision.spatial_merge_size) if grids is None else grids
        n_crops = len(grids) if n_crops is None else n_crops
        tower, projector = dynamic_vision_flops(vision, grids)
    else:
        crop_flops, tokens_per_crop = vision_flops_per_crop(vision)
        if hf_config.vision_feature_select_strategy == "default":
            tokens_per_crop -= 1  # the CLS token is dropped before the projector
        shuffle = getattr(hf_config, "downsample_ratio", 1.0)  # InternVL: pixel shuffle, r^2 as many tokens
        tokens_per_crop = round(tokens_per_crop * shuffle**2)
        kept_per_crop = min(sum(zip_), tokens_per_crop) if zip_ else tokens_per_crop
        if n_crops is None:
            n_crops = math.ceil(n_visual / kept_per_crop) if n_visual else 0
        feature_layers = hf_config.vision_feature_layer
        d_vision = vision.hidden_size * (len(feature_layers) if isinstance(feature_layers, list) else 1)
        d_vision = round(d_vision / shuffle**2)  # each token: r^-2 patches' features side by side
        projected = n_crops * kept_per_crop
        tower = n_crops * crop_flops
        projector = _linear(projected, d_vision, cfg.hidden) + _linear(projected, cfg.hidden, cfg.hidden)

    report = FlopReport(budget, n_visual, n_text, n_crops)
    pre = {
        "vision_tower": tower,
        "token_reduction": 0,
        "projector": projector,
        "position_conv": 0,
        "lm_layers": 0,
        "cross_attention": 0,
        "lm_head": lm.lm_head(),
        "router": 0,
    }
    if router is not None:
        if not schedule.shares_probe(router["probe_layers"]):  # else the probe is the prefill's first layers
            for role in schedule.plan(0)[: router["probe_layers"]]:
                ca = lm.cross(n_text, n_visual, with_kv=True) if role == "ca" else 0
                pre["router"] += lm.layer(n_text, n_text) + ca
        width = router["width"]
        pre["router"] += _linear(1, 2 * cfg.hidden, width) + _linear(1, width, router["n_budgets"])
    dec = {"lm_layers": 0, "cross_attention": 0, "lm_head": lm.lm_head()}
    if zip_ and kept_per_crop < tokens_per_crop:  # scoring in the feature layer + contextual similarity
        n = tokens_per_crop + (vision.model_type.startswith("clip"))
        head_dim = vision.hidden_size // vision.num_attention_heads
        merged = n - zip_[0] - zip_[1]  # tokens joining a contextual target: cosine against each target
        per_crop = 2 * _linear(n, vision.hidden_size, vision.hidden_size) + _attention(n, n, 1, vision.hidden_size) // 2
        pre["token_reduction"] = n_crops * (per_crop + 2 * merged * zip_[1] * head_dim)
    if schedule.position_encoding == "conv" and budget != "full":
        pre["position_conv"] = 2 * n_visual * cfg.hidden * 7 + _linear(n_visual, cfg.hidden, cfg.hidden)
    drops = reduction.drops(cfg.n_layers) if reduction is not None else {}
    n_ctx, n_now = n_text + 1, n_visual  # decode: the new token sees the prompt's text + itself
    for i, role in enumerate(schedule.plan(budget)):
        if role == "sa":
            layer_pre, layer_dec = lm.layer(n_now + n_text, n_now + n_text), lm.layer(1, n_now + n_ctx)
            ca_pre = ca_dec = 0
            score = _attention(1, n_now + n_text, cfg.n_heads, cfg.head_dim) // 2
        else:
            layer_pre, layer_dec = lm.layer(n_text, n_text), lm.layer(1, n_ctx)
            ca_pre = lm.cross(n_text, n_now, with_kv=True) if role == "ca" else 0
            ca_dec = lm.cross(1, n_now, with_kv=False) if role == "ca" else 0
            q_out = cfg.n_heads * cfg.head_dim
            score = _linear(1, cfg.hidden, q_out) + _attention(1, n_now, cfg.n_heads, cfg.head_dim) // 2
        if i in drops:
            if drops[i].next_layer:  # PyramidDrop: the next layer's k for every token, q for the last one
                n_seq, kv_out = n_now + n_text, cfg.n_kv_heads * cfg.head_dim
                q_out = cfg.n_heads * cfg.head_dim
                score = _linear(n_seq, cfg.hidden, kv_out) + _linear(1, cfg.hidden, q_out)
                score += _attention(1, n_seq, cfg.n_heads, cfg.head_dim) // 2
            pre["token_reduction"] += score
            n_next = drops[i].n_keep(n_visual)
        pre["lm_layers"] += layer_pre
        pre["cross_attention"] += ca_pre
        dec["lm_layers"] += layer_dec
        dec["cross_attention"] += ca_dec
        report.layers.append(
            {
                "index": i,
                "role": role,
                "n_visual": n_now,
                "prefill": layer_pre + ca_pre,
                "decode_per_token": layer_dec + ca_dec,
            }
        )
        if i in drops:
            n_now = n_next
    report.breakdown = {"prefill": pre, "decode_per_token": dec}
    report.prefill, report.decode_per_token = sum(pre.values()), sum(dec.values())
    report.lm_prefill = (
        report.prefill - pre["vision_tower"] - pre["projector"] - (0 if not zip_ else pre["token_reduction"])
    )
    return report


def decode_flops(
    hf_config, schedule: Schedule, budget: Budget, n_visual: int, n_text: int, n_new: int, reduction=None
) -> int:
    """Total FLOPs of n_new decode steps after a prompt (step s attends over n_text + s + 1 text keys).

    The first new token comes out of prefill; each later one costs one decode step.
    """
    if n_new <= 1:
        return 0
    first = count_flops(hf_config, schedule, budget, n_visual, n_text, 0, reduction).decode_per_token
    cfg = LMConfig.from_hf(hf_config.text_config)
    per_key = _attention(1, 1, cfg.n_heads, cfg.head_dim) * cfg.n_layers  # each extra text key, every layer
    steps = n_new - 1
    return steps * first + per_key * steps * (steps - 1) // 2
