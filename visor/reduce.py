"""Token-reduction baselines in our forward: FastV, PyramidDrop, VisionZip (and with VISOR), each
as its official code does it (tests compare each with a port of that code on a tiny model).

- FastV (``layer`` K, ``keep`` r; pkunlp-icler/FastV, its KV-cache variant): after K layers, keep
  floor(r x N) of each sample's N visual tokens, those the last prompt token attends to most in layer
  K (head-averaged softmax over every key before it), once at prefill; the kept tokens keep their
  positions. (The paper's no-cache code re-runs the whole sequence for every new token and re-ranks
  with that token as the query; with a KV cache, as here and in FastV's own lmms-eval code, the
  ranking is the prefill's.)
- PyramidDrop (``stages`` s1, s2, ..., ``ratio`` l; Cooperx521/PyramidDrop): after stage k's layers,
  keep floor(l^k x N) of the ORIGINAL N visual tokens, ranked by the last prompt token's attention
  computed with the NEXT layer's input norm and q/k on the stage's output (RoPE at the current
  positions); the tokens left are renumbered 0..n-1, and decode positions in later layers shift
  down by the tokens dropped. Where the model has grouped-query attention (the official code has
  none), each query head uses its K/V head's keys.
- VisionZip (``dominant`` n, ``contextual`` m; dvlab-research/VisionZip): in the vision encoder, per
  crop, n dominant tokens by attention in the feature layer — CLIP: the CLS token's attention, CLS
  kept among the n; SigLIP (no CLS, no official adapter): the attention a token receives, averaged
  over queries and heads — and m contextual tokens: targets strided over the rest, every other token
  joins its most similar target (cosine of head-averaged keys), a contextual token is its target
  plus the mean of what joined it. Crops are packed as the official LLaVA-NeXT adapter packs them
  (see ``visionzip_features``; LLaVA-OneVision has no official adapter).

Each works on any budget: at ``budget="full"`` it is the published baseline; at a VISOR budget
it is VISOR + token reduction (FastV's ranking layer must then be SA or CA at that budget).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .layout import PADDING, Context, Tokens, take

METHODS = ("none", "fastv", "pdrop", "visionzip")
NAMES = {"fastv": "FastV", "pdrop": "PyramidDrop", "visionzip": "VisionZip"}  # as published


@dataclass(frozen=True)
class Drop:
    """Visual tokens dropped after a layer: each sample keeps floor(``keep`` x its ORIGINAL number of
    visual tokens), those the last prompt token attends to most (head-averaged softmax over every
    key before it), ranked with the layer's own q/k (FastV) or, ``next_layer``, with the next layer's
    input norm and q/k applied to this layer's output (PyramidDrop). ``renumber``: positions become
    0..n-1 over the tokens left, and decode positions shift down by the tokens dropped (PyramidDrop;
    FastV keeps the original positions)."""

    keep: float
    next_layer: bool
    renumber: bool

    def n_keep(self, n_original: int) -> int:
        return math.floor(n_original * self.keep)


@dataclass
class Reduction:
    method: str = "none"
    layer: int = 2  # fastv: prune after this many layers
    keep: float = 0.5  # fastv: fraction of visual tokens kept
    stages: list[int] = field(default_factory=list)  # pdrop: prune after these many layers (default L/4, L/2, 3L/4)
    ratio: float = 0.5  # pdrop: lambda, stage k keeps lambda^k of the original visual tokens
    dominant: int = 54  # visionzip: dominant tokens per crop
    contextual: int = 10  # visionzip: contextual (merged) tokens per crop

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown reduction {self.method!r}; choose one of {', '.join(METHODS)}")
        if not (0 < self.keep <= 1 and 0 < self.ratio <= 1):
            raise ConfigError("--keep and --ratio are fractions in (0, 1]")
        if self.dominant < 1 or self.contextual < 0:
            raise ConfigError("--dominant must be at least 1 and --contextual at least 0")

    def drops(self, n_layers: int) -> dict[int, Drop]:
        """{index of the layer after which tokens are dropped: how}."""
        if self.method == "fastv":
            after = [self.layer]
        elif self.method == "pdrop":
            after = self.stages or [n_layers // 4, n_layers // 2, 3 * n_layers // 4]
        else:
            return {}
        if not all(1 <= a < n_layers for a in after):
            raise ConfigError(f"prune points {after} must lie between 1 and {n_layers - 1} layers")
        if self.method == "fastv":
            return {self.layer - 1: Drop(self.keep, next_layer=False, renumber=False)}
        return {
            a - 1: Drop(self.ratio ** (s + 1), next_layer=True, renumber=True) for s, a in enumerate(sorted(set(after)))
        }

    def refusal(self, config) -> str | None:
        """Why this reduction is not defined for the model of this HF config (None: it is)."""
        from .backbone import MROPE

        family, vision = config.model_type, config.vision_config
        if self.method == "pdrop" and family in MROPE:
            return "PyramidDrop renumbers 1-D positions; this model's RoPE is multimodal (M-RoPE)"
        if self.method == "visionzip" and family in MROPE:
            return "VisionZip works on fixed-size CLIP/SigLIP crops, not a dynamic-resolution tower"
        if self.method == "visionzip" and family == "internvl":
            return "VisionZip works on CLIP/SigLIP crops, not before a pixel-shuffle projector"
        deepstack = len(getattr(vision, "deepstack_visual_indexes", None) or [])
        if self.method == "fastv" and self.layer < deepstack:
            last = deepstack - 1
            return f"DeepStack adds visual features up to layer {last}: drop tokens after it (--layer >= {deepstack})"
        return None

    def check(self, config) -> None:
        if (why := self.refusal(config)) is not None:
            raise ConfigError(why)

    @property
    def visionzip(self) -> tuple[int, int] | None:
        return (self.dominant, self.contextual) if self.method == "visionzip" else None

    def label(self) -> str:
        """The published name and the knobs, as reports show them."""
        if self.method == "fastv":
            return f"FastV(K={self.layer}, keep={self.keep:g})"
        if self.method == "pdrop":
            return f"PyramidDrop(stages={self.stages or 'L/4,L/2,3L/4'}, λ={self.ratio:g})"
        if self.method == "visionzip":
            return f"VisionZip({self.dominant}+{self.contextual})"
        return "none"


def visionzip_of(reduction: Reduction | None) -> tuple[int, int] | None:
    """A reduction's VisionZip setting (dominant, contextual): None without one, or for another method."""
    return reduction.visionzip if reduction is not None else None


# ---- FastV / PyramidDrop: hooks of the language model's forward (``VisorLM.run``) -----------------


def query_attention(q, k, valid):
    """Attention probabilities of the ranking queries: q (B, H, Q, hd), k (B, Hkv, S, hd), valid (B, S)
    or, per query, (B, Q, S) -> (B, H, Q, S). Explicit matmuls (they are counted as FLOPs)."""
    n_rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(n_rep, dim=1) if n_rep > 1 else k
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    valid = valid[:, None, None, :] if valid.dim() == 2 else valid[:, None]
    return scores.masked_fill(~valid, float("-inf")).softmax(-1, dtype=torch.float32)


def ranking(probs, queries_valid) -> torch.Tensor:
    """Visual tokens' scores (B, Nv) from the queries' attention over them, probs (B, H, Q, Nv): averaged
    over heads, then over each sample's queries, as PyramidDrop's code averages them."""
    weights = queries_valid.to(probs.dtype)
    return (probs.mean(1) * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)


def _causal(ctx: Context, slots) -> torch.Tensor:
    """(B, Q, S): the slots each query (at ``slots`` (B, Q)) sees."""
    return torch.arange(ctx.seq, device=slots.device)[None, None] <= slots[..., None]


def sa_scores(q, k, ctx: Context) -> torch.Tensor:
    """An SA layer's attention of the ranking queries (``Context.queries``: at inference the last text
    token) over the visual tokens: q (B, H, S, hd), k (B, Hkv, S, hd) in original order -> (B, Nv)."""
    slots = ctx.t_index.gather(1, ctx.queries)  # (B, Q) the queries' slots
    probs = query_attention(take(q, slots, 2), k, _causal(ctx, slots))
    return ranking(take(probs, ctx.v_index, 3), ctx.queries_valid)


def ca_scores(ca, t, k_visual, ctx: Context) -> torch.Tensor:
    """A CA layer's cross-attention of the ranking queries over the visual tokens:
    t (B, Nt, D), k_visual (B, Hkv, Nv, hd) -> (B, Nv)."""
    t_queries = take(t, ctx.queries, 1)  # (B, Q, D)
    rope = None
    if ctx.ca_rope_t is not None:  # the RoPE of the query tokens
        index = ctx.queries[:, None, :, None].expand(-1, 1, -1, ctx.ca_rope_t[0].shape[-1])
        rope = tuple(r.gather(2, index) for r in ctx.ca_rope_t)
    q = ca.query(t_queries, rope)  # as the CA layer computes it
    return ranking(query_attention(q, k_visual, ctx.visual_valid), ctx.queries_valid)


def next_layer_scores(layer, v, t, ctx: Context) -> torch.Tensor:
    """PyramidDrop's ranking: the next layer's input norm and q/k (RoPE at the current positions)
    applied to this layer's output; the ranking queries' (at inference the last prompt token's)
    head-averaged attention over the visual tokens (B, Nv). Keys for every token, queries for those."""
    x = ctx.join(v, t)  # (B, S, D) in original order
    h = layer.input_norm(x)
    slots = ctx.t_index.gather(1, ctx.queries)  # (B, Q) the queries' slots
    rope_q = tuple(take(r, slots, 2) for r in ctx.rope_x)
    q = layer.query(take(h, slots, 1), rope_q)  # (B, H, Q, hd), as the layer computes it
    k = layer.key(h, ctx.rope_x)  # (B, Hkv, S, hd)
    probs = query_attention(q, k, _causal(ctx, slots))
    return ranking(take(probs, ctx.v_index, 3), ctx.queries_valid)


def drop_visual(v, ctx: Context, scores, drop: Drop, n_original: torch.Tensor, tok: Tokens, rotary, with_rope: bool):
    """Keep each sample's top visual states v (B, Nv, D) by ``scores`` (B, Nv), floor(drop.keep x
    ``n_original`` (B,)) of them, in original order. Returns (v, the rebuilt Context, each sample's
    kept indices into v)."""
    n_keep = torch.floor(n_original.double() * drop.keep).long()  # as math.floor in visor.flops
    width = max(1, int(n_keep.max()))
    top = scores.masked_fill(~ctx.visual_valid, float("-inf")).topk(width, dim=1).indices  # (B, K)
    kept = torch.arange(width, device=v.device)[None] < n_keep[:, None]
    order = ctx.visual_pos.gather(1, top).masked_fill(~kept, PADDING).argsort(dim=1)  # back to original order
    top, kept = top.gather(1, order), kept.gather(1, order)
    visual_pos, text_pos = ctx.visual_pos.gather(1, top), None
    visual_rope = None if tok.visual_rope is None else take(ctx.visual_rope, top, 1)
    if drop.renumber:  # positions 0..n-1 over what is left: each token's rank in the original order
        if tok.visual_rope is not None:
            raise ConfigError("PyramidDrop renumbers 1-D positions; this model's RoPE is multimodal (M-RoPE)")
        _, _, rank = Context.slots(visual_pos, kept, ctx.text_pos, tok.text_valid)
        visual_pos, text_pos = rank[:, :width], rank[:, width:]
    new = Context.build(tok, rotary, v.dtype, with_rope, visual_pos, kept, text_pos, visual_rope)
    return take(v, top, 1), new, [row[m].tolist() for row, m in zip(top, kept)]


# ---- VisionZip: in the vision encoder --------------------------------------------------------------


def visionzip_select(tokens, scores, keys, dominant: int, contextual: int, n_fixed: int = 0):
    """VisionZip's rule (dvlab-research/VisionZip, visionzip/utils.py) on one crop or a batch of crops:
    tokens ([C,] N, d), scores ([C,] N), keys ([C,] N, dk) -> ([C,] dominant + contextual, d) and the
    dominant indices ([C,] dominant, original order).

    Dominant: the first ``n_fixed`` tokens (CLIP's CLS) and the ``dominant - n_fixed`` others with the
    highest scores, in original order. Contextual: ``contextual`` targets strided evenly over the rest
    (``arange(0, R, R // m)[:m]``); every other remaining token joins the target whose key is most
    similar (cosine); a contextual token is its target plus the mean of the tokens that joined it."""
    if tokens.dim() == 2:  # one crop
        out, dom = visionzip_select(tokens[None], scores[None], keys[None], dominant, contextual, n_fixed)
        return out[0], dom[0]
    crops, n, width = tokens.shape
    device = tokens.device
    if dominant + contextual >= n:
        return tokens, torch.arange(n, device=device).expand(crops, n)
    top = scores[:, n_fixed:].topk(dominant - n_fixed, dim=1).indices + n_fixed
    dom = torch.cat([torch.arange(n_fixed, device=device).expand(crops, n_fixed), top], 1).sort(1).values
    rest = torch.ones(crops, n, dtype=torch.bool, device=device).scatter_(1, dom, False)
    rest = rest.nonzero()[:, 1].view(crops, n - dominant)  # (C, R): row by row, in original order
    rows = lambda x, idx: x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731 - x[c, idx[c]]
    if contextual == 0:
        return rows(tokens, dom), dom
    is_target = torch.zeros(rest.shape[1], dtype=torch.bool, device=device)
    is_target[torch.arange(0, rest.shape[1], max(1, rest.shape[1] // contextual), device=device)[:contextual]] = True
    targets, merged = rest[:, is_target], rest[:, ~is_target]
    k = F.normalize(keys.float(), dim=-1)
    group = (rows(k, merged) @ rows(k, targets).transpose(1, 2)).argmax(-1)  # (C, R - m): the most similar target
    # summed and counted in float32, as the official matrix product and sum do: bfloat16 stops counting at 256
    sums = torch.zeros(crops, contextual, width, device=device)
    sums.scatter_add_(1, group[..., None].expand(-1, -1, width), rows(tokens, merged).float())
    counts = torch.zeros(crops, contextual, device=device)
    counts.scatter_add_(1, group, torch.ones_like(group, dtype=counts.dtype))
    means = (sums / counts.clamp(min=1)[..., None]).to(tokens.dtype)
    return torch.cat([rows(tokens, dom), rows(tokens, targets) + means], 1), dom


def reduces(config, visionzip: tuple[int, int] | None) -> bool:
    """Whether a VisionZip setting (dominant, contextual) reduces this model's crops (None: no VisionZip);
    where it does not, the plain vision path runs."""
    if visionzip is None:
        return False
    return sum(visionzip) < (config.vision_config.image_size // config.vision_config.patch_size) ** 2


def visionzip_serves_plain(config) -> bool:
    """Whether VisionZip's tower part (``visionzip_tower``) gives the plain path's tokens too, so that
    one scored tower output serves both: one feature layer, every token of it selected."""
    return isinstance(config.vision_feature_layer, int) and config.vision_feature_select_strategy == "full"


def visionzip_tower(backbone, samples: list[list]) -> list:
    """VisionZip's part in the vision tower, for samples with images (one ``visor.backbone.Towered``
    each): every crop's tokens in the feature layer, with their scores and keys there.

    Scores: CLIP (a CLS token) ranks patches by the CLS token's attention in the feature layer;
    SigLIP (no CLS, no official adapter) by the attention a token receives, averaged over queries
    and heads. Keys: the layer's keys, averaged over heads (what contextual tokens are grouped by)."""
    from .backbone import crop_pixels, per_sample

    hf, config = backbone.hf, backbone.config
    layer_index = config.vision_feature_layer
    if not isinstance(layer_index, int):
        raise ConfigError("VisionZip needs a single vision feature layer")
    pixels, patches, sizes = crop_pixels(backbone, samples)
    tower = hf.model.vision_tower
    hidden = tower(pixels.to(backbone.device, hf.lm_head.weight.dtype), output_hidden_states=True).hidden_states
    j = layer_index % len(hidden)  # hidden[j] is the output of encoder layer j - 1
    encoder = tower.encoder if hasattr(tower, "encoder") else tower.vision_model.encoder
    layer = encoder.layers[j - 1]
    h = layer.layer_norm1(hidden[j - 1])
    heads = config.vision_config.num_attention_heads
    q, k = (p(h).unflatten(-1, (heads, -1)).transpose(1, 2) for p in (layer.self_attn.q_proj, layer.self_attn.k_proj))
    attn = ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(-1)  # (C, H, N, N)
    if _has_cls(config):  # the CLS token's attention over the patches; CLS itself is always kept
        scores = torch.cat([attn.new_zeros(attn.shape[0], 1), attn[:, :, 0, 1:].mean(1)], 1)
    else:
        scores = attn.mean(1).mean(1)  # attention received, averaged over queries and heads
    return per_sample(samples, patches, sizes, hidden[j], scores, k.mean(1))


def _has_cls(config) -> bool:
    return config.vision_config.model_type.startswith("clip")


def visionzip_features(backbone, samples: list[list], dominant: int, contextual: int, towered=None) -> list:
    """VisionZip-reduced projector outputs of several samples' images (one ``visor.backbone.Visual``
    per sample: its images' tokens and the number of crops encoded); the tower runs once for all
    (``towered``: its outputs, kept from ``Backbone.tower_batch`` scored; then it does not run).

    Per crop, ``visionzip_select`` on ``visionzip_tower``'s tokens, scores and keys (CLIP keeps its
    CLS token among the dominant ones, as the official code does). The reduced crops are laid out as
    the official LLaVA-NeXT adapter lays them out (``llava_arch.py``): an AnyRes image is its base
    crop's tokens, then the other crops' dominant tokens in raster order over the stitched grid, then
    their contextual tokens (no unpadding, no newline tokens); a one-crop image of a model with
    newline tokens (LLaVA-OneVision) ends with one, as the model's own packing does."""
    from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape as anyres_grid

    from .backbone import Visual

    hf, config = backbone.hf, backbone.config
    Reduction("visionzip", dominant=dominant, contextual=contextual).check(config)
    if not any(samples) or not reduces(config, (dominant, contextual)):
        return backbone.image_features_batch(samples, towered=towered)  # no image, or nothing to reduce: the plain path
    present = [images for images in samples if images]
    towered = visionzip_tower(backbone, present) if towered is None else [t for t in towered if t is not None]
    if any(t.scores is None for t in towered):
        raise ConfigError("VisionZip: the kept tower outputs lack its scores and keys (keep them scored)")
    fixed = int(_has_cls(config))
    feats, scores, keys = (torch.cat(parts) for parts in zip(*[(t.tokens, t.scores, t.keys) for t in towered]))
    reduced, kept_indices = visionzip_select(feats, scores, keys, dominant, contextual, fixed)
    projected = hf.model.multi_modal_projector(reduced)  # every crop: n + m
    newline = getattr(hf.model, "image_newline", None)
    patches = [p for t in towered for p in t.patches]
    sizes = [s for t in towered for s in t.sizes or [None] * len(t.patches)]
    per_image, start = [], 0
    for p, size in zip(patches, sizes):
        if p == 1:
            tokens = projected[start]
            per_image.append(tokens if newline is None else torch.cat([tokens, newline[None].to(tokens)]))
        else:  # an AnyRes image (LLaVA-OneVision)
            grid = anyres_grid(size, config.image_grid_pinpoints, config.vision_config.image_size)
            kept = list(kept_indices[start : start + p])
            per_image.append(_anyres_layout(projected[start : start + p], kept, grid, feats.shape[1] - fixed, fixed))
        start += p
    images, crop_counts = iter(per_image), iter(sum(t.patches) for t in towered)
    return [Visual([next(images) for _ in own], next(crop_counts)) if own else Visual([], 0) for own in samples]


def _anyres_layout(projected, dominant, grid, n_patches: int, n_fixed: int) -> torch.Tensor:
    """One AnyRes image as the official LLaVA-NeXT adapter packs it: the base crop's tokens; the other
    crops' dominant patches in raster order over the stitched (rows x side, columns x side) grid; their
    fixed (CLS) tokens; their contextual tokens, crop by crop."""
    side, (_, columns) = math.isqrt(n_patches), grid
    tokens, dom = projected[1:], torch.stack(list(dominant[1:]))  # (crops, kept, d), (crops, n_fixed + dominant)
    n_dom, width = dom.shape[1], tokens.shape[-1]
    patch = dom[:, n_fixed:] - n_fixed  # index among the crop's patches
    c = torch.arange(len(dom), device=dom.device)[:, None]
    row, col = (c // columns) * side + patch // side, (c % columns) * side + patch % side
    order = (row * columns * side + col).flatten().argsort()
    patches = tokens[:, n_fixed:n_dom].reshape(-1, width)[order]
    return torch.cat(
        [projected[0], patches, tokens[:, :n_fixed].reshape(-1, width), tokens[:, n_dom:].reshape(-1, width)]
    )
