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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .cache import KVCache
from .errors import CheckpointError, ConfigError

_SDPA_GQA = torch.__version__ >= "2.5"  # scaled_dot_product_attention(..., enable_gqa=True)
_FEW_QUERIES = 256  # see _sdpa
_PADDING = torch.iinfo(torch.long).max  # the position of padding tokens: after every real one

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
    """cos/sin tables for arbitrary (B, S) position ids, any RoPE type transformers knows."""

    def __init__(self, text_config):
        super().__init__()
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        rope = getattr(text_config, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type == "dynamic":
            raise CheckpointError("dynamic-NTK RoPE is not supported (its frequencies change with length)")
        if rope_type == "default":
            dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
            theta = rope.get("rope_theta", getattr(text_config, "rope_theta", 10000.0))
            inv_freq, self.scaling = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
        else:
            inv_freq, self.scaling = ROPE_INIT_FUNCTIONS[rope_type](text_config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions[..., None].float() * self.inv_freq  # (B, S, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, S, hd)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


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


def last_token_attention(q_last, k, valid):
    """Attention probabilities of one query per sample: q_last (B, H, 1, hd), k (B, Hkv, S, hd),
    valid (B, S) -> (B, H, 1, S). Explicit matmuls (they are counted as FLOPs)."""
    n_rep = q_last.shape[1] // k.shape[1]
    k = k.repeat_interleave(n_rep, dim=1) if n_rep > 1 else k
    scores = (q_last @ k.transpose(-1, -2)) / math.sqrt(q_last.shape[-1])
    return scores.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1, dtype=torch.float32)


def _rows(rope, ctx):
    """RoPE of each sample's last text token, from the per-token tables."""
    if rope is None:
        return None
    index = ctx.last_text[:, None, None, None].expand(-1, 1, 1, rope[0].shape[-1])
    return tuple(r.gather(2, index) for r in rope)


def take(x, index, dim):
    """x gathered at ``index`` (B, N) along the token dimension ``dim`` (1 for states, 2 for K/V)."""
    shape = list(x.shape)
    shape[dim] = index.shape[1]
    index = index.clamp(max=x.shape[dim] - 1).view(
        index.shape[0], *([1] * (dim - 1)), index.shape[1], *([1] * (x.dim() - dim - 1))
    )
    return x.gather(dim, index.expand(shape))


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
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads

    def qkv(self, x, rope):
        h = self.input_norm(x)
        q = apply_rope(split_heads(self.q_proj(h), self.n_heads), rope)
        k = apply_rope(split_heads(self.k_proj(h), self.n_kv_heads), rope)
        return q, k, split_heads(self.v_proj(h), self.n_kv_heads)

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
        self.gate = nn.Parameter(torch.zeros(1, dtype=norm.dtype, device=norm.device))  # 1-D: FSDP2 shards no scalars
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads

    def visual_kv(self, v, rope):  # v (B, Nv, D) -> k, v (B, Hkv, Nv, hd)
        h = self.kv_norm(v)
        k = apply_rope(split_heads(self.k_proj(h), self.n_kv_heads), rope)
        return k, split_heads(self.v_proj(h), self.n_kv_heads)

    def forward(self, t, kv, rope, mask, seen=None, explicit=False):
        """t (B, Nt, D); mask (B, Nt, Nv) or None: every row sees every visual token; ``seen``
        (B, Nt, 1): the rows that see any (from the mask if not given). Unseen rows (text with no
        visual token before it) are not updated."""
        q = apply_rope(split_heads(self.q_proj(self.norm(t)), self.n_heads), rope)
        out = self.o_proj(merge_heads(attend(q, *kv, mask, explicit, causal=False)))
        seen = mask.any(-1, keepdim=True) if seen is None else seen
        return t + torch.tanh(self.gate) * out * seen.to(out.dtype)


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


@dataclass
class Tokens:
    """One batch split into visual and text tokens, each right-padded."""

    visual: torch.Tensor  # (B, Nv, D) projector outputs
    visual_pos: torch.Tensor  # (B, Nv) original positions
    visual_valid: torch.Tensor  # (B, Nv) bool
    text_ids: torch.Tensor  # (B, Nt)
    text_pos: torch.Tensor  # (B, Nt)
    text_valid: torch.Tensor  # (B, Nt) bool
    layout: tuple | None = None  # (seq, block) of Context, when known: building the Context then needs no host sync


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
        self.layers = nn.ModuleList(DecoderLayer(layer, cfg) for layer in lm.layers)
        self.rotary = Rotary(text_config).to(self.lm_head.weight.device)
        self.cross = nn.ModuleDict({str(i): CrossAttention(self.layers[i], cfg) for i in schedule.ca_layers})
        like = self.lm_head.weight
        self.pos_conv = VisualPosConv(cfg.hidden, like) if schedule.position_encoding == "conv" else None
        self.policy = None  # a visor.policy.Policy once trained: picks budgets for "auto"
        self.explicit_attention = False  # True: matmul attention, visible to FLOP counters
        self.gradient_checkpointing = False  # training: recompute each layer in backward
        self._compiled = None  # see compiled()

    def visor_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters VISOR adds to the base checkpoint (CA modules, conv positional code)."""
        own = {f"cross.{k}": v for k, v in self.cross.state_dict().items()}
        for name in ("pos_conv", "policy"):
            if getattr(self, name) is not None:
                own.update({f"{name}.{k}": v for k, v in getattr(self, name).state_dict().items()})
        return own

    # ---- the layer loop -------------------------------------------------------------------
    def run(
        self, tok: Tokens, budgets: list, cache: KVCache | None = None, drops: dict | None = None, trace=None
    ) -> tuple[torch.Tensor, list]:
        """All layers over a batch; each sample has its own budget ("auto": the policy picks it
        from the states entering the first SA candidate). Returns the final text states
        (B, Nt, D), before the final norm, and the budgets used.

        ``drops`` {layer: keep}: after that layer, keep that fraction of each sample's visual
        tokens, ranked by the attention the last text token pays them in that layer (FastV,
        PyramidDrop). ``trace``: a dict that receives the kept token indices per drop layer."""
        v, t, ctx = self.inputs(tok, budgets)
        drops = drops or {}
        if drops and ("auto" in budgets or len(set(budgets)) > 1):
            raise ConfigError("token dropping needs one fixed budget for the whole batch")
        ctx.score_at = frozenset(drops)
        route_at = self.schedule.sa_candidates[0] if "auto" in budgets else -1
        active = self.active_layers(budgets)
        for i in range(self.cfg.n_layers):
            if i == route_at:
                budgets = self.route(v, t, tok, budgets)
                active = self.active_layers(budgets)
            step = lambda v, t, i=i, sa=active[i], ctx=ctx: self.layer(i, v, t, ctx, cache, sa)  # noqa: E731
            if self.gradient_checkpointing and torch.is_grad_enabled() and cache is None:
                v, t = torch.utils.checkpoint.checkpoint(step, v, t, use_reentrant=False)
            else:
                v, t = step(v, t)
            if i in drops:
                if i not in ctx.scores:
                    raise ConfigError(f"layer {i} runs text-only at this budget: nothing ranks its visual tokens")
                v, ctx = self.drop_visual(tok, v, ctx, ctx.scores.pop(i), drops[i], trace, i)
        return t, budgets

    def drop_visual(self, tok: Tokens, v, ctx: Context, scores, keep: float, trace, layer: int):
        """Keep the top ``keep`` fraction of each sample's visual tokens by ``scores`` (B, Nv)."""
        n_keep = torch.ceil(ctx.visual_valid.sum(1) * keep).long()  # (B,)
        width = max(1, int(n_keep.max()))
        top = scores.masked_fill(~ctx.visual_valid, float("-inf")).topk(width, dim=1).indices  # (B, K)
        kept = torch.arange(width, device=v.device)[None] < n_keep[:, None]
        order = ctx.visual_pos.gather(1, top).masked_fill(~kept, _PADDING).argsort(dim=1)  # back to original order
        top, kept = top.gather(1, order), kept.gather(1, order)
        if trace is not None:
            trace.setdefault("kept", {})[layer] = [row[m].tolist() for row, m in zip(top, kept)]
        visual_pos = ctx.visual_pos.gather(1, top)
        new = Context.build(tok, self.rotary, v.dtype, self.pos_conv is None, visual_pos, kept)
        new.score_at = ctx.score_at
        return take(v, top, 1), new

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

    def policy_features(self, tok: Tokens) -> torch.Tensor:
        """What the policy reads: the states entering the first SA candidate (the same for every
        budget but "full"), pooled. (B, 2D)"""
        from .policy import Policy

        batch = tok.text_ids.shape[0]
        v, t, ctx = self.inputs(tok, [0] * batch)
        for i in range(self.schedule.sa_candidates[0]):
            v, t = self.layer(i, v, t, ctx, None, [False] * batch)
        return Policy.features(v, t, tok.visual_valid, tok.text_valid)

    def active_layers(self, budgets: list) -> list[list[bool]]:
        """active[i][b]: layer i runs full self-attention for sample b."""
        sets = [self.schedule.active_sa(b) if b != "auto" else frozenset() for b in budgets]
        return [[i in s for s in sets] for i in range(self.cfg.n_layers)]

    def route(self, v, t, tok: Tokens, budgets: list) -> list:
        if self.policy is None:
            raise ConfigError("budget 'auto' needs a trained policy: run `visor train-policy` first")
        chosen = self.policy.choose(self.policy.features(v, t, tok.visual_valid, tok.text_valid))
        return [int(c) if b == "auto" else b for b, c in zip(budgets, chosen.tolist())]

    def layer(self, i: int, v, t, ctx: Context, cache: KVCache | None, sa: list[bool]):
        """Layer i for the whole batch; rows with sa[b] run full self-attention, the rest text-only
        (after cross-attention, at a CA layer)."""
        if all(sa):
            return self.sa_layer(i, v, t, ctx, cache, None)
        if not any(sa):
            return v, self.text_layer(i, v, t, ctx, cache, None)
        rows_sa = torch.tensor([b for b, a in enumerate(sa) if a], device=v.device)
        rows_tx = torch.tensor([b for b, a in enumerate(sa) if not a], device=v.device)
        v_sa, t_sa = self.sa_layer(i, v[rows_sa], t[rows_sa], ctx.select(rows_sa), cache, rows_sa)
        t_tx = self.text_layer(i, v[rows_tx], t[rows_tx], ctx.select(rows_tx), cache, rows_tx)
        return v.index_copy(0, rows_sa, v_sa), t.index_copy(0, rows_sa, t_sa).index_copy(0, rows_tx, t_tx)

    def sa_layer(self, i, v, t, ctx: Context, cache, rows):
        """The original layer over the original sequence order (right-padded): causal attention."""
        layer = self.layers[i]
        x = ctx.join(v, t)
        q, k, val = layer.qkv(x, ctx.rope_x)
        if cache is not None:
            (k_v, k_t), (val_v, val_t) = ctx.split(k, 2), ctx.split(val, 2)
            cache.store_visual("sa", i, k_v, val_v, ctx.visual_valid, rows)
            cache.write_text(i, k_t, val_t, rows)
        if i in ctx.score_at:  # attention of the last text token over the visual tokens, head-averaged
            last = ctx.t_index.gather(1, ctx.last_text[:, None])  # (B, 1) its slot
            q_last = take(q, last, 2)  # (B, H, 1, hd)
            probs = last_token_attention(q_last, k, torch.arange(ctx.seq, device=x.device)[None] <= last)
            ctx.scores[i] = take(probs, ctx.v_index, 3).mean(1)[:, 0]  # (B, Nv)
        return ctx.split(layer.finish(x, attend(q, k, val, None, self.explicit_attention)), 1)

    def text_layer(self, i, v, t, ctx: Context, cache, rows):
        """Cross-attention to the visual states (at CA layers), then the layer on text alone."""
        layer = self.layers[i]
        if self.schedule.roles[i] == "ca":
            ca = self.cross[str(i)]
            kv = ca.visual_kv(v, ctx.ca_rope_v)
            if cache is not None:
                cache.store_visual("ca", i, *kv, ctx.visual_valid, rows)
            if i in ctx.score_at:  # the last text token's cross-attention over the visual tokens
                t_last = take(t, ctx.last_text[:, None], 1)  # (B, 1, D)
                q_last = apply_rope(split_heads(ca.q_proj(ca.norm(t_last)), ca.n_heads), _rows(ctx.ca_rope_t, ctx))
                ctx.scores[i] = last_token_attention(q_last, kv[0], ctx.visual_valid).mean(1)[:, 0]
            t = ca(t, kv, ctx.ca_rope_t, ctx.mask_tv, ctx.seen, self.explicit_attention)
        q, k, val = layer.qkv(t, ctx.rope_t)
        if cache is not None:
            cache.write_text(i, k, val, rows)
        return layer.finish(t, attend(q, k, val, None, self.explicit_attention))  # text in order: causal

    def logits(self, t):
        return self.lm_head(self.norm(t))

    # ---- inference --------------------------------------------------------------------------
    @contextlib.contextmanager
    def compiled(self):
        """Within: each layer's pieces (``qkv``, ``finish``, cross-attention) run through
        ``torch.compile``, so that a piece's norms, RoPE and elementwise work fuse into a few
        kernels. Each piece is compiled once per input shape and dtype and shared by all layers."""
        if self._compiled is None:
            pieces = [(layer, name) for layer in self.layers for name in ("qkv", "finish")]
            pieces += [(ca, name) for ca in self.cross.values() for name in ("visual_kv", "forward")]
            self._compiled = [(m, name, torch.compile(getattr(m, name), dynamic=False)) for m, name in pieces]
        for module, name, fn in self._compiled:
            setattr(module, name, fn)  # shadows the class's method
        try:
            yield
        finally:
            for module, name, _ in self._compiled:
                module.__dict__.pop(name, None)

    def prefill(self, tok: Tokens, budget, capacity: int, drops: dict | None = None) -> tuple[torch.Tensor, KVCache]:
        """Run the prompt; return the last text token's logits (B, V) and the filled cache.
        ``budget``: one for the batch, or a list with one per sample."""
        batch = tok.text_ids.shape[0]
        budgets = list(budget) if isinstance(budget, (list, tuple)) else [budget] * batch
        budgets = [b if b == "auto" else self.schedule.parse_budget(b) for b in budgets]
        cache = KVCache(self.cfg.n_layers, tok.text_valid, capacity)
        t, cache.budgets = self.run(tok, budgets, cache, drops)
        cache.advance(t.shape[1])
        last = tok.text_valid.sum(1) - 1  # (B,) index of each sample's last text token
        cache.next_pos = tok.text_pos.gather(1, last[:, None])[:, 0] + 1
        return self.logits(t[torch.arange(batch, device=t.device), last]), cache

    def decode_one_token(self, token_ids: torch.Tensor, cache: KVCache, static: bool = False) -> torch.Tensor:
        """One new token per sample (B,) -> logits (B, V). Touches only cached K/V: a sample sees
        visual keys at layer i only where its prefill stored them (SA or CA, per its budget).
        ``static``: attend over the whole preallocated cache with the unfilled slots masked, so
        that every step has the same shapes and no host sync (see ``visor.generate.Decoder``)."""
        dtype, explicit = self.lm_head.weight.dtype, self.explicit_attention
        t = self.embed_tokens(token_ids[:, None])  # (B, 1, D)
        rope = self.rotary(cache.next_pos[:, None], dtype)
        ca_rope = None if self.pos_conv is not None else rope
        cache.mark_filled(static)
        text_mask = (cache.text_valid if static else cache.text_mask(1))[:, None, :]  # (B, 1, capacity | length+1)

        for i, layer in enumerate(self.layers):
            if cache.ca_kv[i] is not None:
                t = self.cross[str(i)](t, cache.ca_kv[i], ca_rope, cache.ca_mask[i][:, None, :], explicit=explicit)
            q, k, val = layer.qkv(t, rope)
            k, val = cache.write_slot(i, k, val) if static else cache.write_text(i, k, val)
            mask = text_mask
            if cache.sa_buffer[i] is not None:  # [visual | text] K/V: one view of the layer's buffers, no copy
                k, val, valid = cache.sa_keys_values(i, k.shape[2])
                mask = valid[:, None, :]
            t = layer.finish(t, attend(q, k, val, mask, explicit))

        if static:
            cache.slot.add_(1)  # the host-side count is the caller's to keep (no Python state in a graph)
        else:
            cache.advance(1)
        cache.next_pos.add_(1)
        return self.logits(t[:, 0])


@dataclass
class Context:
    """Per-batch tensors every layer needs; ``select(rows)`` for a sub-batch. Rebuilt when
    visual tokens are dropped (token-reduction baselines)."""

    seq: int  # longest sequence in the batch (tokens still present)
    v_index: torch.Tensor  # (B, Nv) slot of each visual token in original order; padding -> seq
    t_index: torch.Tensor  # (B, Nt)
    visual_pos: torch.Tensor  # (B, Nv) original positions
    visual_valid: torch.Tensor  # (B, Nv)
    last_text: torch.Tensor  # (B,) index of each sample's last text token
    mask_tv: torch.Tensor | None  # (B, Nt, Nv) visual token k precedes text token q; None: see ``block``
    seen: torch.Tensor  # (B, Nt, 1) text token q has a visual token before it
    rope_t: tuple
    rope_x: tuple  # RoPE of the slots 0..seq-1 (SA layers)
    ca_rope_t: tuple | None  # None: CA without RoPE (conv positional code)
    ca_rope_v: tuple | None
    # slot of the first visual token when every sample is unpadded with its visual tokens in one
    # run at the same slot (one image, no batch padding): then the original order is a concat,
    # and cross-attention needs no mask
    block: int | None = None
    score_at: frozenset = frozenset()  # layers whose last-token attention ranks visual tokens
    scores: dict = field(default_factory=dict)  # layer -> (B, Nv) scores, filled by those layers

    @classmethod
    def build(cls, tok: Tokens, rotary: Rotary, dtype, with_rope: bool, visual_pos=None, visual_valid=None) -> Context:
        visual_pos = tok.visual_pos if visual_pos is None else visual_pos
        visual_valid = tok.visual_valid if visual_valid is None else visual_valid
        n_visual = visual_pos.shape[1]
        pos, order, rank = cls.slots(visual_pos, visual_valid, tok.text_pos, tok.text_valid)
        own_layout = tok.layout is not None and visual_valid is tok.visual_valid
        seq, block = tok.layout if own_layout else cls.layout(rank, visual_valid, tok.text_valid)
        slot_pos = pos.gather(1, order)[:, :seq]
        slot_pos = slot_pos.masked_fill(slot_pos == _PADDING, 0)
        rope_t = rotary(tok.text_pos, dtype)
        if block is None:
            mask_tv = (visual_pos[:, None, :] < tok.text_pos[:, :, None]) & visual_valid[:, None, :]
            seen = mask_tv.any(-1, keepdim=True)
        else:  # one run of visual tokens: a text token sees all of them or none (attention needs no mask)
            mask_tv, seen = None, (tok.text_pos > visual_pos[:, :1])[..., None]
        return cls(
            seq=seq,
            v_index=torch.where(visual_valid, rank[:, :n_visual], seq),
            t_index=torch.where(tok.text_valid, rank[:, n_visual:], seq),
            visual_pos=visual_pos,
            visual_valid=visual_valid,
            last_text=tok.text_valid.sum(1) - 1,
            mask_tv=mask_tv,
            seen=seen,
            rope_t=rope_t,
            rope_x=rotary(slot_pos, dtype),
            ca_rope_t=rope_t if with_rope else None,
            ca_rope_v=rotary(visual_pos, dtype) if with_rope else None,
            block=block,
        )

    @staticmethod
    def slots(visual_pos, visual_valid, text_pos, text_valid):
        """Every token's slot, its rank among the sample's tokens in original order (padding
        last): (positions with padding at _PADDING, argsort, rank), each (B, Nv + Nt)."""
        padded = visual_pos.masked_fill(~visual_valid, _PADDING), text_pos.masked_fill(~text_valid, _PADDING)
        pos = torch.cat(padded, 1)
        order = pos.argsort(dim=1, stable=True)
        slots = torch.arange(pos.shape[1], device=pos.device).expand_as(order)
        return pos, order, torch.empty_like(order).scatter_(1, order, slots)

    @classmethod
    def layout_of(cls, tok: Tokens) -> tuple[int, int | None]:
        """(seq, block) of a batch, without building the rest of a Context; one host sync."""
        _, _, rank = cls.slots(tok.visual_pos, tok.visual_valid, tok.text_pos, tok.text_valid)
        return cls.layout(rank, tok.visual_valid, tok.text_valid)

    @staticmethod
    def layout(rank, visual_valid, text_valid) -> tuple[int, int | None]:
        """(seq, block) from every token's slot ``rank`` (B, Nv + Nt); one host sync."""
        n_visual = visual_valid.shape[1]
        # one run of visual tokens at the same slot in every sample, text around it in order, no padding
        first = rank[:1, :1] if n_visual else torch.zeros(1, 1, dtype=torch.long, device=rank.device)
        slots = torch.arange(rank.shape[1], device=rank.device)
        text_slots = slots[: rank.shape[1] - n_visual]
        expected = torch.cat([first + slots[:n_visual], text_slots + n_visual * (text_slots >= first)], 1)
        block_ok = (rank == expected).all() & visual_valid.all() & text_valid.all()
        seq, block_ok, first = torch.stack(
            [(visual_valid.sum(1) + text_valid.sum(1)).max(), block_ok.long(), first[0, 0]]
        ).tolist()
        return seq, first if block_ok and n_visual else None

    def join(self, v, t):
        """Visual (B, Nv, D) and text (B, Nt, D) states -> the sequence in original order (B, S, D)."""
        if self.block is not None:
            return torch.cat([t[:, : self.block], v, t[:, self.block :]], 1)
        x = v.new_zeros(v.shape[0], self.seq + 1, v.shape[2])  # slot S collects padding
        x = x.scatter(1, self.v_index[..., None].expand_as(v), v).scatter(1, self.t_index[..., None].expand_as(t), t)
        return x[:, : self.seq]

    def split(self, x, dim: int):
        """The inverse of ``join`` along the token dimension ``dim`` (1: states, 2: K/V): (visual, text)."""
        if self.block is not None:
            a, n = self.block, self.v_index.shape[1]
            text = torch.cat([x.narrow(dim, 0, a), x.narrow(dim, a + n, x.shape[dim] - a - n)], dim)
            return x.narrow(dim, a, n), text
        return take(x, self.v_index, dim), take(x, self.t_index, dim)

    def select(self, rows: torch.Tensor) -> Context:
        pick = lambda x: None if x is None else (tuple(y[rows] for y in x) if isinstance(x, tuple) else x[rows])  # noqa: E731
        names = (
            "v_index",
            "t_index",
            "visual_pos",
            "visual_valid",
            "last_text",
            "mask_tv",
            "seen",
            "rope_t",
            "rope_x",
            "ca_rope_t",
            "ca_rope_v",
        )
        return Context(self.seq, *(pick(getattr(self, f)) for f in names), block=self.block)
