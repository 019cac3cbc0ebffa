"""The token layout of a batch: visual and text tokens kept apart, each right-padded, with their
original sequence positions (``Tokens``), and what every layer needs to move between that split
and the original sequence order (``Context``: slots, masks, RoPE tables)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .model import Rotary

PADDING = torch.iinfo(torch.long).max  # the position of padding tokens: after every real one


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
    # multimodal RoPE (Qwen-VL): the visual tokens' (time, row, column) positions and the text's own
    # (all three alike); None: RoPE at the sequence positions above
    visual_rope: torch.Tensor | None = None  # (B, Nv, 3)
    text_rope: torch.Tensor | None = None  # (B, Nt)
    deepstack: torch.Tensor | None = None  # (K, B, Nv, D) Qwen3-VL: added to the visual states after layer k < K
    # the text tokens whose attention ranks the visual tokens for a token drop (FastV, PyramidDrop): (B, Q)
    # indices into the text and whether each is one; None: each sample's last text token (the prompt's end).
    # Training gives the token before each answer, as PyramidDrop's training does: not one that saw the answer
    queries: torch.Tensor | None = None
    queries_valid: torch.Tensor | None = None


def take(x, index, dim):
    """x gathered at ``index`` (B, N) along the token dimension ``dim`` (1 for states, 2 for K/V)."""
    shape = list(x.shape)
    shape[dim] = index.shape[1]
    index = index.clamp(max=x.shape[dim] - 1).view(
        index.shape[0], *([1] * (dim - 1)), index.shape[1], *([1] * (x.dim() - dim - 1))
    )
    return x.gather(dim, index.expand(shape))


@dataclass
class Context:
    """Per-batch tensors every layer needs; ``select(rows)`` for a sub-batch. Rebuilt when
    visual tokens are dropped (token-reduction baselines)."""

    seq: int  # longest sequence in the batch (tokens still present)
    v_index: torch.Tensor  # (B, Nv) slot of each visual token in original order; padding -> seq
    t_index: torch.Tensor  # (B, Nt)
    visual_pos: torch.Tensor  # (B, Nv) positions (original, unless a token drop renumbered them)
    visual_valid: torch.Tensor  # (B, Nv)
    text_pos: torch.Tensor  # (B, Nt) likewise
    visual_rope: torch.Tensor  # (B, Nv) or (B, Nv, 3): the RoPE positions (visual_pos, or multimodal)
    queries: torch.Tensor  # (B, Q) text tokens whose attention ranks the visual tokens (see Tokens)
    queries_valid: torch.Tensor  # (B, Q)
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
    deepstack: torch.Tensor | None = None  # (K, B, Nv, D), see Tokens

    @classmethod
    def build(
        cls,
        tok: Tokens,
        rotary: Rotary,
        dtype,
        with_rope: bool,
        visual_pos=None,
        visual_valid=None,
        text_pos=None,
        visual_rope=None,
    ) -> Context:
        """The context of ``tok``; after a token drop, of the visual tokens left (``visual_pos``,
        ``visual_valid``, ``visual_rope`` with multimodal RoPE) and, where positions were renumbered,
        the text's new ``text_pos``."""
        visual_pos = tok.visual_pos if visual_pos is None else visual_pos
        visual_valid = tok.visual_valid if visual_valid is None else visual_valid
        text_pos = tok.text_pos if text_pos is None else text_pos
        if tok.visual_rope is None:  # RoPE at the sequence positions
            visual_rope, text_rope = visual_pos, text_pos
        else:
            visual_rope, text_rope = tok.visual_rope if visual_rope is None else visual_rope, tok.text_rope
        n_visual = visual_pos.shape[1]
        pos, order, rank = cls.slots(visual_pos, visual_valid, text_pos, tok.text_valid)
        own_layout = tok.layout is not None and visual_valid is tok.visual_valid
        seq, block = tok.layout if own_layout else cls.layout(rank, visual_valid, tok.text_valid)
        if tok.visual_rope is None:
            slot_pos = pos.gather(1, order)[:, :seq]
            slot_pos = slot_pos.masked_fill(slot_pos == PADDING, 0)
        else:  # each slot's (time, row, column) position; padding's are any
            both = torch.cat([visual_rope, text_rope[..., None].expand(-1, -1, 3)], 1)
            slot_pos = both.gather(1, order[:, :seq, None].expand(-1, -1, 3))
        rope_t = rotary(text_rope, dtype)
        if block is None:
            mask_tv = (visual_pos[:, None, :] < text_pos[:, :, None]) & visual_valid[:, None, :]
            seen = mask_tv.any(-1, keepdim=True)
        else:  # one run of visual tokens: a text token sees all of them or none (attention needs no mask)
            mask_tv, seen = None, (text_pos > visual_pos[:, :1])[..., None]
        return cls(
            seq=seq,
            v_index=torch.where(visual_valid, rank[:, :n_visual], seq),
            t_index=torch.where(tok.text_valid, rank[:, n_visual:], seq),
            visual_pos=visual_pos,
            visual_valid=visual_valid,
            text_pos=text_pos,
            visual_rope=visual_rope,
            queries=(tok.text_valid.sum(1, keepdim=True) - 1) if tok.queries is None else tok.queries,
            queries_valid=torch.ones_like(tok.text_valid[:, :1]) if tok.queries is None else tok.queries_valid,
            mask_tv=mask_tv,
            seen=seen,
            rope_t=rope_t,
            rope_x=rotary(slot_pos, dtype),
            ca_rope_t=rope_t if with_rope else None,
            ca_rope_v=rotary(visual_rope, dtype) if with_rope else None,
            block=block,
            deepstack=tok.deepstack if visual_valid is tok.visual_valid else None,  # refused after a token drop
        )

    @staticmethod
    def slots(visual_pos, visual_valid, text_pos, text_valid):
        """Every token's slot, its rank among the sample's tokens in original order (padding
        last): (positions with padding at PADDING, argsort, rank), each (B, Nv + Nt)."""
        padded = visual_pos.masked_fill(~visual_valid, PADDING), text_pos.masked_fill(~text_valid, PADDING)
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
            "text_pos",
            "visual_rope",
            "queries",
            "queries_valid",
            "mask_tv",
            "seen",
            "rope_t",
            "rope_x",
            "ca_rope_t",
            "ca_rope_v",
        )
        deepstack = None if self.deepstack is None else self.deepstack[:, rows]
        return Context(self.seq, *(pick(getattr(self, f)) for f in names), block=self.block, deepstack=deepstack)
