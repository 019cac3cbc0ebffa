"""Token-reduction baselines in our forward: FastV, PyramidDrop, VisionZip (and with VISOR).

- FastV (``layer`` K, ``keep`` r): after K layers, keep the fraction r of each sample's visual
  tokens with the most attention from the last text token in layer K (head-averaged).
- PyramidDrop (``stages`` s1, s2, ..., ``ratio`` l): after each stage's layers, keep the fraction
  l of the remaining visual tokens, ranked the same way (scores recomputed from that layer's q/k,
  so SDPA stays usable for everything else).
- VisionZip (``dominant`` n, ``contextual`` m): in the vision encoder, per crop, keep the n tokens
  that receive the most attention in the feature layer and merge the rest into m contextual
  tokens. SigLIP has no CLS token: a token's score is the attention it receives, averaged over
  all queries and heads (CLIP: the CLS token's attention). Contextual merging: m targets spaced
  evenly among the remaining tokens; every other remaining token joins the target whose key is
  most similar (cosine of head-averaged keys); a contextual token is the mean of its group.
  Reduced crops are concatenated per image (no AnyRes unpadding or newline tokens).

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


@dataclass
class Reduction:
    method: str = "none"
    layer: int = 2  # fastv: prune after this many layers
    keep: float = 0.5  # fastv: fraction of visual tokens kept
    stages: list[int] = field(default_factory=list)  # pdrop: prune after these many layers (default L/4, L/2, 3L/4)
    ratio: float = 0.5  # pdrop: fraction kept at each stage
    dominant: int = 54  # visionzip: dominant tokens per crop
    contextual: int = 10  # visionzip: contextual (merged) tokens per crop

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown reduction {self.method!r}; choose one of {', '.join(METHODS)}")
        if not (0 < self.keep <= 1 and 0 < self.ratio <= 1):
            raise ConfigError("--keep and --ratio are fractions in (0, 1]")
        if self.dominant < 1 or self.contextual < 0:
            raise ConfigError("--dominant must be at least 1 and --contextual at least 0")

    def drops(self, n_layers: int) -> dict[int, float]:
        """{layer index whose attention ranks the tokens: fraction kept after it}."""
        if self.method == "fastv":
            after = [self.layer]
        elif self.method == "pdrop":
            after = self.stages or [n_layers // 4, n_layers // 2, 3 * n_layers // 4]
        else:
            return {}
        if not all(1 <= a < n_layers for a in after):
            raise ConfigError(f"prune points {after} must lie between 1 and {n_layers - 1} layers")
        fraction = self.keep if self.method == "fastv" else self.ratio
        return {a - 1: fraction for a in sorted(set(after))}

    @property
    def visionzip(self) -> tuple[int, int] | None:
        return (self.dominant, self.contextual) if self.method == "visionzip" else None

    def label(self) -> str:
        if self.method == "fastv":
            return f"fastv(K={self.layer}, keep={self.keep:g})"
        if self.method == "pdrop":
            return f"pdrop(stages={self.stages or 'L/4,L/2,3L/4'}, ratio={self.ratio:g})"
        if self.method == "visionzip":
            return f"visionzip({self.dominant}+{self.contextual})"
        return "none"


# ---- FastV / PyramidDrop: hooks of the language model's forward (``VisorLM.run``) -----------------


def last_token_attention(q_last, k, valid):
    """Attention probabilities of one query per sample: q_last (B, H, 1, hd), k (B, Hkv, S, hd),
    valid (B, S) -> (B, H, 1, S). Explicit matmuls (they are counted as FLOPs)."""
    n_rep = q_last.shape[1] // k.shape[1]
    k = k.repeat_interleave(n_rep, dim=1) if n_rep > 1 else k
    scores = (q_last @ k.transpose(-1, -2)) / math.sqrt(q_last.shape[-1])
    return scores.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1, dtype=torch.float32)


def sa_scores(q, k, ctx: Context) -> torch.Tensor:
    """An SA layer's attention of the last text token over the visual tokens, head-averaged:
    q (B, H, S, hd), k (B, Hkv, S, hd) in original order -> (B, Nv)."""
    last = ctx.t_index.gather(1, ctx.last_text[:, None])  # (B, 1) its slot
    q_last = take(q, last, 2)  # (B, H, 1, hd)
    probs = last_token_attention(q_last, k, torch.arange(ctx.seq, device=q.device)[None] <= last)
    return take(probs, ctx.v_index, 3).mean(1)[:, 0]


def ca_scores(ca, t, k_visual, ctx: Context) -> torch.Tensor:
    """A CA layer's cross-attention of the last text token over the visual tokens, head-averaged:
    t (B, Nt, D), k_visual (B, Hkv, Nv, hd) -> (B, Nv)."""
    from .model import apply_rope, split_heads

    t_last = take(t, ctx.last_text[:, None], 1)  # (B, 1, D)
    rope = None
    if ctx.ca_rope_t is not None:  # the RoPE of each sample's last text token
        index = ctx.last_text[:, None, None, None].expand(-1, 1, 1, ctx.ca_rope_t[0].shape[-1])
        rope = tuple(r.gather(2, index) for r in ctx.ca_rope_t)
    q_last = apply_rope(split_heads(ca.q_proj(ca.norm(t_last)), ca.n_heads), rope)
    return last_token_attention(q_last, k_visual, ctx.visual_valid).mean(1)[:, 0]


def drop_visual(v, ctx: Context, scores, keep: float, tok: Tokens, rotary, with_rope: bool):
    """Keep the top ``keep`` fraction of each sample's visual states v (B, Nv, D) by ``scores``
    (B, Nv), in original order; returns (v, the rebuilt Context, each sample's kept indices)."""
    n_keep = torch.ceil(ctx.visual_valid.sum(1) * keep).long()  # (B,)
    width = max(1, int(n_keep.max()))
    top = scores.masked_fill(~ctx.visual_valid, float("-inf")).topk(width, dim=1).indices  # (B, K)
    kept = torch.arange(width, device=v.device)[None] < n_keep[:, None]
    order = ctx.visual_pos.gather(1, top).masked_fill(~kept, PADDING).argsort(dim=1)  # back to original order
    top, kept = top.gather(1, order), kept.gather(1, order)
    visual_pos = ctx.visual_pos.gather(1, top)
    new = Context.build(tok, rotary, v.dtype, with_rope, visual_pos, kept)
    return take(v, top, 1), new, [row[m].tolist() for row, m in zip(top, kept)]


# ---- VisionZip: in the vision encoder --------------------------------------------------------------


def visionzip_select(tokens, scores, keys, dominant: int, contextual: int):
    """One crop: tokens (N, d), scores (N,), keys (N, dk) -> (n + m, d) reduced tokens and the
    dominant indices (in original order). Rest merged into m contextual tokens."""
    n = tokens.shape[0]
    if dominant + contextual >= n:
        return tokens, torch.arange(n, device=tokens.device)
    dom = scores.topk(dominant).indices.sort().values
    rest = torch.ones(n, dtype=torch.bool, device=tokens.device)
    rest[dom] = False
    rest = rest.nonzero()[:, 0]  # (R,) in original order
    if contextual == 0:
        return tokens[dom], dom
    targets = rest[torch.linspace(0, len(rest) - 1, contextual, device=tokens.device).round().long()]
    k = F.normalize(keys.float(), dim=-1)
    group = (k[rest] @ k[targets].T).argmax(-1)  # (R,) most similar target; targets pick themselves
    group[torch.isin(rest, targets)] = torch.searchsorted(targets, rest[torch.isin(rest, targets)])
    sums = torch.zeros(contextual, tokens.shape[1], dtype=tokens.dtype, device=tokens.device).index_add_(
        0, group, tokens[rest]
    )
    counts = torch.bincount(group, minlength=contextual).clamp(min=1).to(tokens.dtype)
    return torch.cat([tokens[dom], sums / counts[:, None]]), dom


def visionzip_features(backbone, images, dominant: int, contextual: int) -> tuple[list[torch.Tensor], int]:
    """VisionZip-reduced projector outputs per image and the number of crops encoded."""
    hf, config = backbone.hf, backbone.config
    if dominant + contextual >= (config.vision_config.image_size // config.vision_config.patch_size) ** 2:
        return backbone.image_features(images)  # nothing to reduce: the checkpoint's own path
    layer_index = config.vision_feature_layer
    if not isinstance(layer_index, int):
        raise ConfigError("VisionZip needs a single vision feature layer")
    dtype = hf.lm_head.weight.dtype
    if config.model_type == "llava_onevision":
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        inputs = backbone.image_processor([images], return_tensors="pt")
        patches = [
            image_size_to_num_patches(s, config.image_grid_pinpoints, config.vision_config.image_size)
            if len(images) == 1
            else 1
            for s in inputs["image_sizes"].tolist()
        ]
        pixels = torch.cat([pv[:p] for pv, p in zip(inputs["pixel_values"], patches)])
    else:
        pixels = backbone.image_processor(images, return_tensors="pt")["pixel_values"]
        patches = [1] * len(images)
    pixels = pixels.to(backbone.device, dtype)
    tower = hf.model.vision_tower
    hidden = tower(pixels, output_hidden_states=True).hidden_states  # L + 1 entries
    n_layers = len(hidden) - 1
    j = layer_index % (n_layers + 1)  # hidden[j] is the output of encoder layer j - 1
    encoder = tower.encoder if hasattr(tower, "encoder") else tower.vision_model.encoder
    layer = encoder.layers[j - 1]
    h = layer.layer_norm1(hidden[j - 1])
    heads = config.vision_config.num_attention_heads
    q, k = (p(h).unflatten(-1, (heads, -1)).transpose(1, 2) for p in (layer.self_attn.q_proj, layer.self_attn.k_proj))
    attn = ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(-1)  # (C, H, N, N)
    feats, keys = hidden[j], k.mean(1)  # (C, N, dv), (C, N, hd)
    if config.vision_feature_select_strategy == "default":  # CLIP: score = the CLS token's attention
        scores, feats, keys = attn[:, :, 0, 1:].mean(1), feats[:, 1:], keys[:, 1:]
    else:
        scores = attn.mean(1).mean(1)  # attention received, averaged over queries and heads
    reduced = [visionzip_select(f, s, kk, dominant, contextual)[0] for f, s, kk in zip(feats, scores, keys)]
    projected = [hf.model.multi_modal_projector(r) for r in reduced]
    out, start = [], 0
    for p in patches:
        out.append(torch.cat(projected[start : start + p]))
        start += p
    return out, pixels.shape[0]
