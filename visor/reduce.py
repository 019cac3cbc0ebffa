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
