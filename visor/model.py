"""The VISOR language model: our forward over the weights of a Hugging Face decoder.

The decoder layers (q/k/v/o projections, SwiGLU MLP, RMSNorms), embeddings, final norm and
lm_head are the checkpoint's own modules, shared, not copied; only the math is ours. Cross-
attention (CA) modules are new parameters. Visual and text states are kept apart:

    v: (B, Nv, D) visual states,  t: (B, Nt, D) text states,

each right-padded, with its original sequence positions and a validity mask. RoPE and causality
use the original positions: an SA layer scatters both back into the original sequence order and
is exactly the original layer there; text-only layers attend causally over the text alone.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .cache import KVCache
from .errors import CheckpointError, ConfigError
from .layout import Context, Tokens

_SDPA_GQA = torch.__version__ >= "2.5"  # scaled_dot_product_attention(..., enable_gqa=True)
_FEW_QUERIES = 256  # see _sdpa

# ---------------------------------------------------------------------------------------------
# configuration


@dataclass
class LMConfig:
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int
    rms_eps: float

    @classmethod
    def from_hf(cls, text_config) -> LMConfig:
        c = text_config
        if getattr(c, "hidden_act", "silu") != "silu":
            raise CheckpointError(f"only SwiGLU (silu) MLPs are supported, the checkpoint uses {c.hidden_act!r}")
        if getattr(c, "use_sliding_window", False):
            raise CheckpointError("sliding-window attention is not supported; set use_sliding_window=false")
        return cls(
            n_layers=c.num_hidden_layers,
            hidden=c.hidden_size,
            n_heads=c.num_attention_heads,
            n_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            intermediate=c.intermediate_size,
            vocab=c.vocab_size,
            max_positions=c.max_position_embeddings,
            rms_eps=c.rms_norm_eps,
        )


# ---------------------------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, x):  # normalised in float32, scaled in the input's dtype, as transformers does
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class Rotary(nn.Module):
    """cos/sin tables (B, 1, S, hd) for arbitrary (B, S) position ids, or (B, S, 3) multimodal ones
    (time, row, column: Qwen-VL's M-RoPE, whose rotary embedding splits its frequencies over the
    three): the checkpoint's own rotary embedding (its RoPE type, frequencies, scaling and sections),
    shaped for our (B, H, S, hd) heads. A multimodal embedding given (B, S) positions uses them for
    all three, as the model does for text."""

    def __init__(self, hf_rotary: nn.Module):
        super().__init__()
        if "dynamic" in str(getattr(hf_rotary, "rope_type", "default")):
            raise CheckpointError("dynamic-NTK RoPE is not supported (its frequencies change with length)")
        self.hf = hf_rotary

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        like = torch.empty(0, dtype=dtype, device=positions.device)  # what it reads: the dtype and device
        cos, sin = self.hf(like, positions.permute(2, 0, 1) if positions.dim() == 3 else positions)  # (B, S, hd)
        return cos[:, None], sin[:, None]


def apply_rope(x, rope):
    if rope is None:
        return x
    cos, sin = rope
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attend(q, k, v, mask=None, explicit: bool = False, causal: bool = True):
    """Attention. q (B, Hq, Sq, hd), k/v (B, Hkv, Sk, hd).

    ``mask`` (B, Sq, Sk), True = may attend; None = causal over a square (``causal``, which lets
    SDPA skip the masked half) or every key. Query rows with no key to attend to (e.g. text
    before the first image, in a CA layer) return zeros. ``explicit`` runs plain matmuls so that
    FLOP counters see them. Grouped-query attention never copies K/V: the query heads that share
    a K/V head are stacked along the query axis instead (or SDPA's own ``enable_gqa`` does it,
    without a mask).
    """
    n_rep = q.shape[1] // k.shape[1]
    if mask is None and not explicit:
        if n_rep > 1 and not _SDPA_GQA:
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        return _sdpa(q, k, v, is_causal=causal, **({"enable_gqa": True} if _SDPA_GQA else {}))
    if mask is None:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
        mask = (mask.tril() if causal else mask)[None]
    has_key = mask.any(-1, keepdim=True)  # (B, Sq, 1)
    mask = (mask | ~has_key)[:, None]  # (B, 1, Sq, Sk)
    b, h, sq, hd = q.shape
    q = q.reshape(b, k.shape[1], n_rep * sq, hd)  # head g*n_rep + r -> K/V head g, query row r*sq + s
    mask = mask.repeat(1, 1, n_rep, 1) if n_rep > 1 else mask
    if explicit:
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        scores = scores.masked_fill(~mask, float("-inf"))
        out = scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.reshape(b, h, sq, hd) * has_key[:, None].to(out.dtype)


def _sdpa(q, k, v, **kwargs):
    """SDPA without a mask. On CUDA, few queries (text-only and CA layers) go to flash or
    memory-efficient attention: cuDNN's, which PyTorch may prefer, costs ~50 µs a call even for 64
    tokens on an H200, several times the work; long sequences keep PyTorch's choice."""
    if q.is_cuda and q.shape[2] <= _FEW_QUERIES:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def head_norm(norm, x):  # a per-head RMSNorm (Qwen3's q/k norms), or nothing
    return x if norm is None else norm(x)


def split_heads(x, n_heads):  # (B, S, H*hd) -> (B, H, S, hd)
    b, s, _ = x.shape
    return x.view(b, s, n_heads, x.shape[-1] // n_heads).transpose(1, 2)


def merge_heads(x):  # (B, H, S, hd) -> (B, S, H*hd)
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


class DecoderLayer(nn.Module):
    """One original decoder layer (pre-norm attention + SwiGLU MLP) over HF's modules."""

    def __init__(self, hf_layer, cfg: LMConfig):
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.input_norm = RMSNorm(hf_layer.input_layernorm.weight, cfg.rms_eps)
        self.post_norm = RMSNorm(hf_layer.post_attention_layernorm.weight, cfg.rms_eps)
        # Qwen3: an RMSNorm over each head's query and key, before RoPE
        self.q_norm = RMSNorm(attn.q_norm.weight, cfg.rms_eps) if hasattr(attn, "q_norm") else None
        self.k_norm = RMSNorm(attn.k_norm.weight, cfg.rms_eps) if hasattr(attn, "k_norm") else None
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads

    def qkv(self, x, rope):
        h = self.input_norm(x)
        return self.query(h, rope), self.key(h, rope), split_heads(self.v_proj(h), self.n_kv_heads)

    def query(self, h, rope):  # h: normed input (B, S, D) -> (B, H, S, hd)
        return apply_rope(head_norm(self.q_norm, split_heads(self.q_proj(h), self.n_heads)), rope)

    def key(self, h, rope):
        return apply_rope(head_norm(self.k_norm, split_heads(self.k_proj(h), self.n_kv_heads)), rope)

    def finish(self, x, attn_out):
        x = x + self.o_proj(merge_heads(attn_out))
        h = self.post_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class CrossAttention(nn.Module):
    """text <- text + tanh(gate) * o(Attn(q(norm(text)), k(visual), v(visual))).

    Pre-norm on both sides (queries and visual keys/values), GQA-shaped like the base layer.
    Initialised as a copy of its layer's own attention and input norm, with gate = 0: a freshly
    converted model's CA layers are exact no-ops, and training starts from projections that
    already speak the layer's language.
    """

    def __init__(self, layer: DecoderLayer, cfg: LMConfig):
        super().__init__()
        self.q_proj, self.k_proj = copy.deepcopy(layer.q_proj), copy.deepcopy(layer.k_proj)
        self.v_proj, self.o_proj = copy.deepcopy(layer.v_proj), copy.deepcopy(layer.o_proj)
        norm = layer.input_norm.weight.detach()
        self.norm = RMSNorm(nn.Parameter(norm.clone()), cfg.rms_eps)  # for the text queries
        self.kv_norm = RMSNorm(nn.Parameter(norm.clone()), cfg.rms_eps)  # for the visual keys/values
        copy_norm = lambda n: None if n is None else RMSNorm(nn.Parameter(n.weight.detach().clone()), cfg.rms_eps)  # noqa: E731
        self.q_norm, self.k_norm = (
            copy_norm(layer.q_norm),
            copy_norm(layer.k_norm),
        )  # per head, where the layer has them
        self.gate = nn.Parameter(torch.zeros(1, dtype=norm.dtype, device=norm.device))  # 1-D: FSDP2 shards no scalars
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads

    def visual_kv(self, v, rope):  # v (B, Nv, D) -> k, v (B, Hkv, Nv, hd)
        h = self.kv_norm(v)
        k = apply_rope(head_norm(self.k_norm, split_heads(self.k_proj(h), self.n_kv_heads)), rope)
        return k, split_heads(self.v_proj(h), self.n_kv_heads)

    def query(self, t, rope):  # t (B, Nt, D) -> (B, H, Nt, hd)
        return apply_rope(head_norm(self.q_norm, split_heads(self.q_proj(self.norm(t)), self.n_heads)), rope)

    def forward(self, t, kv, rope, mask, seen=None, explicit=False):
        """t (B, Nt, D); mask (B, Nt, Nv) or None: every row sees every visual token; ``seen``
        (B, Nt, 1): the rows that see any (from the mask if not given). Unseen rows (text with no
        visual token before it) are not updated."""
        q = self.query(t, rope)
        out = self.o_proj(merge_heads(attend(q, *kv, mask, explicit, causal=False)))
        seen = mask.any(-1, keepdim=True) if seen is None else seen
        return t + torch.tanh(self.gate) * out * seen.to(out.dtype)


class FusionLayer(nn.Module):
    """A CA layer, as torchtune's ``FusionLayer``: the original decoder layer with a cross-attention
    from the text to the visual states in front of it. Text only ever runs through it (a CA layer is
    SA at a VISOR budget): text <- CrossAttention(text, visual), then the layer on text alone. At
    budget "full" (the base model) it runs as its original layer, ``layer``."""

    def __init__(self, layer: DecoderLayer, cfg: LMConfig):
        super().__init__()
        self.layer, self.cross = layer, CrossAttention(layer, cfg)


class VisualPosConv(nn.Module):
    """The paper's conditional positional encoding: v + pointwise(depthwise_conv_k7(v)).

    The pointwise projection starts at zero, so enabling it leaves a model's outputs unchanged.
    """

    def __init__(self, hidden: int, like: torch.Tensor, kernel: int = 7):
        super().__init__()
        self.depthwise = nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2, groups=hidden).to(like)
        self.pointwise = nn.Linear(hidden, hidden).to(like)
        nn.init.zeros_(self.pointwise.weight)
        nn.init.zeros_(self.pointwise.bias)

    def forward(self, v, valid):  # v (B, Nv, D), valid (B, Nv)
        v = v * valid[..., None].to(v.dtype)
        return v + self.pointwise(self.depthwise(v.transpose(1, 2)).transpose(1, 2))


# ---------------------------------------------------------------------------------------------
# the language model


class VisorLM(nn.Module):
    def __init__(self, hf_model, schedule):
        super().__init__()
        text_config = hf_model.config.text_config
        self.cfg = cfg = LMConfig.from_hf(text_config)
        schedule.check_depth(cfg.n_layers)
        self.schedule = schedule
        lm = hf_model.model.language_model
        self.embed_tokens = hf_model.get_input_embeddings()
        self.lm_head = hf_model.get_output_embeddings()
        self.norm = RMSNorm(lm.norm.weight, cfg.rms_eps)
        layers = [DecoderLayer(layer, cfg) for layer in lm.layers]
        layers = [FusionLayer(layer, cfg) if i in schedule.ca_layers else layer for i, layer in enumerate(layers)]
        self.layers = nn.ModuleList(layers)  # DecoderLayer, or FusionLayer at CA layers
        self.originals = [getattr(layer, "layer", layer) for layer in layers]  # each DecoderLayer (registered once)
        self.rotary = Rotary(lm.rotary_emb)
        like = self.lm_head.weight
        self.pos_conv = VisualPosConv(cfg.hidden, like) if schedule.position_encoding == "conv" else None
        self.policy = None  # a visor.policy.Policy once trained: picks budgets for "auto"
        self.explicit_attention = False  # True: matmul attention, visible to FLOP counters
        self.gradient_checkpointing = False  # training: recompute each layer in backward
        self._compiled = None  # see compiled()

    @property
    def cross(self) -> dict[str, CrossAttention]:
        """The CA layers' cross-attention modules, by layer index (str)."""
        return {str(i): layer.cross for i, layer in enumerate(self.layers) if isinstance(layer, FusionLayer)}

    def visor_modules(self) -> dict[str, nn.Module]:
        """What VISOR adds to the base checkpoint (cross-attention, the conv positional code, the
        policy), by the prefix its tensors have in checkpoint files (``cross.3``, ``pos_conv``, ...)."""
        own = {f"cross.{i}": ca for i, ca in self.cross.items()}
        return own | {name: getattr(self, name) for name in ("pos_conv", "policy") if getattr(self, name) is not None}

    def visor_state_dict(self) -> dict[str, torch.Tensor]:
        """VISOR's tensors by their checkpoint names (views of the parameters: copying into them loads)."""
        return {f"{prefix}.{k}": v for prefix, m in self.visor_modules().items() for k, v in m.state_dict().items()}

    def visor_keys(self) -> dict[str, str]:
        """Checkpoint name -> this module's own name (``cross.3.gate`` -> ``layers.3.cross.gate``)."""
        paths = {id(m): name for name, m in self.named_modules()}
        modules = self.visor_modules().items()
        return {f"{prefix}.{k}": f"{paths[id(m)]}.{k}" for prefix, m in modules for k in m.state_dict()}

    # ---- the layer loop -------------------------------------------------------------------
    def run(self, tok: Tokens, budgets: list, cache: KVCache | None = None, drops: dict | None = None) -> Forward:
        """All layers over a batch; each sample has its own budget ("auto": the policy picks it from the
        probe's features, see ``probe``: where ``Schedule.shares_probe``, after the probe's layers of this
        pass, else from a probe run first). ``cache``: filled with each layer's K/V.

        ``drops`` {layer: ``visor.reduce.Drop``}: after that layer, keep some of each sample's visual
        tokens, those the last text token attends to most (FastV, PyramidDrop)."""
        from .policy import Policy
        from .reduce import drop_visual, next_layer_scores

        if "auto" in budgets and self.policy is None:
            raise ConfigError("budget 'auto' needs a trained policy: run `visor train-policy` first")
        v, t, ctx = self.inputs(tok, budgets)
        drops = drops or {}
        if drops and ("auto" in budgets or len(set(budgets)) > 1):
            raise ConfigError("token dropping needs one fixed budget for the whole batch")
        if tok.deepstack is not None and any(i < tok.deepstack.shape[0] - 1 for i in drops):
            last = tok.deepstack.shape[0] - 1
            raise ConfigError(f"DeepStack adds visual features up to layer {last}: drop tokens after it, not before")
        if "auto" in budgets and not self.schedule.shares_probe(self.probe_depth):  # a probe of its own first
            budgets = self.route(self.probe(v, t, ctx, tok), budgets)
        active, kept = self.active_layers(budgets), {}
        n_original, shift = tok.visual_valid.sum(1), None  # shift: positions renumbered away (B,)
        for i in range(self.cfg.n_layers):
            if "auto" in budgets and i == self.probe_depth:  # the probe's layers ran at budget 0: route here
                budgets = self.route(Policy.features(v, t, tok.visual_valid, tok.text_valid), budgets)
                active = self.active_layers(budgets)
            if cache is not None:
                cache.open_layer(i, v.shape[1] if any(active[i]) else 0, shift)
            own_scores = i in drops and not drops[i].next_layer
            step = lambda v, t, i=i, sa=active[i], ctx=ctx, s=own_scores: self.layer(i, v, t, ctx, cache, sa, s)  # noqa: E731
            if self.gradient_checkpointing and torch.is_grad_enabled() and cache is None:
                v, t, scores = torch.utils.checkpoint.checkpoint(step, v, t, use_reentrant=False)
            else:
                v, t, scores = step(v, t)
            if i in drops and v.shape[1] == 0:  # no visual token in the batch: nothing to drop
                kept[i] = [[] for _ in budgets]
            elif i in drops:
                if drops[i].next_layer:
                    scores = next_layer_scores(self.originals[i + 1], v, t, ctx)
                elif scores is None:
                    raise ConfigError(f"layer {i} runs text-only at this budget: nothing ranks its visual tokens")
                v, ctx, kept[i] = drop_visual(
                    v, ctx, scores, drops[i], n_original, tok, self.rotary, self.pos_conv is None
                )
                if drops[i].renumber:
                    shift = n_original - ctx.visual_valid.sum(1)
        return Forward(t, budgets, kept)

    def inputs(self, tok: Tokens, budgets: list) -> tuple[torch.Tensor, torch.Tensor, Context]:
        """Visual states (with the conv code where used), text embeddings, per-batch context."""
        dtype = self.lm_head.weight.dtype
        v = tok.visual.to(dtype)
        t = self.embed_tokens(tok.text_ids)
        conv_rows = [b != "full" for b in budgets]  # the base model ("full") has no conv code
        if self.pos_conv is not None and any(conv_rows):
            coded = self.pos_conv(v, tok.visual_valid)
            v = (
                coded
                if all(conv_rows)
                else torch.where(torch.tensor(conv_rows, device=v.device)[:, None, None], coded, v)
            )
        return v, t, Context.build(tok, self.rotary, dtype, with_rope=self.pos_conv is None)

    @property
    def probe_depth(self) -> int:
        """How many layers the policy's probe runs: the trained policy's own, else the schedule's
        (up to and including the first CA layer)."""
        return self.policy.config["probe_layers"] if self.policy is not None else self.schedule.probe_layers

    def probe(self, v, t, ctx: Context, tok: Tokens, depth: int | None = None) -> torch.Tensor:
        """What the policy reads: the first ``depth`` layers run at budget 0 (text-only; at a CA layer
        the text reads the visual tokens), then visual and text states pooled. (B, 2D)"""
        from .policy import Policy

        depth = self.probe_depth if depth is None else depth
        for i in range(depth):
            v, t, _ = self.layer(i, v, t, ctx, None, [False] * t.shape[0])
        return Policy.features(v, t, tok.visual_valid, tok.text_valid)

    def policy_features(self, tok: Tokens, depth: int | None = None) -> torch.Tensor:
        """The probe's features of a batch (what ``visor train-policy`` fits the router on). (B, 2D)"""
        v, t, ctx = self.inputs(tok, [0] * tok.text_ids.shape[0])
        return self.probe(v, t, ctx, tok, depth)

    def active_layers(self, budgets: list) -> list[list[bool]]:
        """active[i][b]: layer i runs full self-attention for sample b."""
        sets = [self.schedule.active_sa(b) if b != "auto" else frozenset() for b in budgets]
        return [[i in s for s in sets] for i in range(self.cfg.n_layers)]

    def route(self, features: torch.Tensor, budgets: list) -> list:
        """Each "auto" in ``budgets`` replaced by the policy's choice on the probe's ``features``."""
        chosen = self.policy.choose(features)
        return [int(c) if b == "auto" else b for b, c in zip(budgets, chosen.tolist())]

    def layer(self, i: int, v, t, ctx: Context, cache: KVCache | None, sa: list[bool], score: bool = False):
        """Layer i for the whole batch; rows with sa[b] run full self-attention, the rest text-only
        (after cross-attention, at a CA layer). Returns (v, t, scores): ``score`` asks for the
        attention the last text token pays each visual token there (B, Nv), what token dropping
        ranks by (None where the layer sees no visual token, or in a batch of mixed roles)."""
        if all(sa):
            v, t, scores = self.sa_layer(i, v, t, ctx, cache, None, score)
        elif not any(sa):
            t, scores = self.text_layer(i, v, t, ctx, cache, None, score)
        else:
            rows_sa = torch.tensor([b for b, a in enumerate(sa) if a], device=v.device)
            rows_tx = torch.tensor([b for b, a in enumerate(sa) if not a], device=v.device)
            v_sa, t_sa, _ = self.sa_layer(i, v[rows_sa], t[rows_sa], ctx.select(rows_sa), cache, rows_sa)
            t_tx, _ = self.text_layer(i, v[rows_tx], t[rows_tx], ctx.select(rows_tx), cache, rows_tx)
            t = t.index_copy(0, rows_sa, t_sa).index_copy(0, rows_tx, t_tx)
            v, scores = v.index_copy(0, rows_sa, v_sa), None
        if ctx.deepstack is not None and i < ctx.deepstack.shape[0]:
            # DeepStack (Qwen3-VL): the tower's intermediate features join the visual states after
            # layer i, as the base model adds them at the visual positions, whatever the layer's role
            v = v + ctx.deepstack[i].to(v.dtype)
        return v, t, scores

    def sa_layer(self, i, v, t, ctx: Context, cache, rows, score=False):
        """The original layer over the original sequence order (right-padded): causal attention."""
        from .reduce import sa_scores

        layer = self.originals[i]
        x = ctx.join(v, t)
        q, k, val = layer.qkv(x, ctx.rope_x)
        if cache is not None:
            (k_v, k_t), (val_v, val_t) = ctx.split(k, 2), ctx.split(val, 2)
            cache.layers[i].store_visual(k_v, val_v, ctx.visual_valid, rows)
            cache.layers[i].update(0, k_t, val_t, rows)
        scores = sa_scores(q, k, ctx) if score else None
        v, t = ctx.split(layer.finish(x, attend(q, k, val, None, self.explicit_attention)), 1)
        return v, t, scores

    def text_layer(self, i, v, t, ctx: Context, cache, rows, score=False):
        """Cross-attention to the visual states (at CA layers), then the layer on text alone.
        Returns (t, scores) (see ``layer``)."""
        from .reduce import ca_scores

        layer, scores = self.originals[i], None
        if isinstance(self.layers[i], FusionLayer):
            ca = self.layers[i].cross
            kv = ca.visual_kv(v, ctx.ca_rope_v)
            if cache is not None:
                cache.store_cross(i, *kv, ctx.visual_valid, rows)
            scores = ca_scores(ca, t, kv[0], ctx) if score else None
            t = ca(t, kv, ctx.ca_rope_t, ctx.mask_tv, ctx.seen, self.explicit_attention)
        q, k, val = layer.qkv(t, ctx.rope_t)
        if cache is not None:
            cache.layers[i].update(0, k, val, rows)
        return layer.finish(t, attend(q, k, val, None, self.explicit_attention)), scores  # text in order: causal

    def logits(self, t):
        return self.lm_head(self.norm(t))

    # ---- inference --------------------------------------------------------------------------
    @contextlib.contextmanager
    def compiled(self):
        """Within: each layer's pieces (``qkv``, ``finish``, cross-attention) run through
        ``torch.compile``, so that a piece's norms, RoPE and elementwise work fuse into a few
        kernels. Each piece is compiled once per input shape and dtype and shared by all layers."""
        if self._compiled is None:
            pieces = [(layer, name) for layer in self.originals for name in ("qkv", "finish")]
            pieces += [(ca, name) for ca in self.cross.values() for name in ("visual_kv", "forward")]
            self._compiled = [(m, name, torch.compile(getattr(m, name), dynamic=False)) for m, name in pieces]
        for module, name, fn in self._compiled:
            setattr(module, name, fn)  # shadows the class's method
        try:
            yield
        finally:
            for module, name, _ in self._compiled:
                module.__dict__.pop(name, None)

    def prefill(self, tok: Tokens, budget, capacity: int, drops: dict | None = None) -> Prefilled:
        """Run the prompt into a new cache with room for ``capacity`` text tokens (prompt + new).
        ``budget``: one for the batch, or a list with one per sample."""
        batch = tok.text_ids.shape[0]
        budgets = list(budget) if isinstance(budget, (list, tuple)) else [budget] * batch
        budgets = [b if b == "auto" else self.schedule.parse_budget(b) for b in budgets]
        cache = KVCache(self.cfg, tok.text_valid, capacity, self.lm_head.weight.dtype)
        out = self.run(tok, budgets, cache, drops)
        last = tok.text_valid.sum(1) - 1  # (B,) index of each sample's last text token
        text_rope = tok.text_pos if tok.text_rope is None else tok.text_rope
        cache.rope_offset = text_rope.gather(1, last[:, None])[:, 0] + 1 - cache.n_prompt
        logits = self.logits(out.text[torch.arange(batch, device=last.device), last])
        return Prefilled(logits, cache, out.budgets, out.kept)

    def decode_one_token(self, token_ids: torch.Tensor, cache: KVCache, input_pos: int | torch.Tensor) -> torch.Tensor:
        """One new token per sample (B,) at text slot ``input_pos`` -> logits (B, V). Touches only
        cached K/V: a sample sees visual keys at layer i only where its prefill stored them (SA or
        CA, per its budget). An int ``input_pos`` attends over the slots filled so far; a (1,)
        tensor over the whole preallocated cache with the later slots masked, so that every step
        has the same shapes and no host sync (see ``visor.cache`` and ``visor.generate.Decoder``)."""
        dtype, explicit = self.lm_head.weight.dtype, self.explicit_attention
        t = self.embed_tokens(token_ids[:, None])  # (B, 1, D)
        shift, rope = None, self.rotary((cache.rope_offset + input_pos)[:, None], dtype)
        for i, (layer, fused) in enumerate(zip(self.originals, self.layers)):
            if cache.layers[i].shift is not shift:  # positions renumbered by a token drop (PyramidDrop)
                shift = cache.layers[i].shift
                rope = self.rotary((cache.rope_offset - (0 if shift is None else shift) + input_pos)[:, None], dtype)
            ca_rope = None if self.pos_conv is not None else rope
            if cache.cross[i] is not None:
                k, val, valid = cache.cross[i]
                t = fused.cross(t, (k, val), ca_rope, valid[:, None, :], explicit=explicit)
            q, k, val = layer.qkv(t, rope)
            k, val, valid = cache.layers[i].update(input_pos, k, val)  # [visual | text] at SA layers: a view
            t = layer.finish(t, attend(q, k, val, valid[:, None, :], explicit))
        return self.logits(t[:, 0])


class Forward(NamedTuple):
    """What a pass over all layers produced."""

    text: torch.Tensor  # (B, Nt, D) final text states, before the final norm
    budgets: list  # the budget each sample ran with ("auto" resolved by the policy)
    kept: dict  # {drop layer: each sample's kept visual tokens (indices)}, where tokens were dropped


class Prefilled(NamedTuple):
    """What a prefill produced."""

    logits: torch.Tensor  # (B, V) of each sample's last prompt token
    cache: KVCache
    budgets: list
    kept: dict
