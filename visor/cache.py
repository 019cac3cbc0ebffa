"""The KV cache of a VISOR forward, in the style of gpt-fast's ``KVCache``.

Every layer owns one preallocated buffer pair, ``[visual | text capacity]`` along the sequence:
an SA layer keeps its own K/V of the visual tokens in front of its text K/V, so a decode step
attends over one slice of it (nothing is concatenated per token); a layer that sees text only has
no visual part. A CA layer also keeps its cross-attention K/V of the visual states, computed once
at prefill. Decode steps never touch visual *states* again, only these keys and values. In a
batch with per-sample budgets, a layer's visual K/V hold only the rows that use them; the
validity of the other rows' is all False.

The cache holds no position: the caller owns ``input_pos``, the text slot a step writes (0 for
the prompt; the decoder counts from there), and passes it to ``update(input_pos, k, v)``. An int
``input_pos`` returns the slots filled so far (shapes grow by one each step); a (1,) tensor on the
device returns the whole buffer with the slots after it masked (the same shapes every step and no
host synchronisation: what CUDA graphs and ``torch.compile`` need). Nothing else in the cache
changes after the prefill.
"""

from __future__ import annotations

import torch


class LayerKV:
    """One layer's self-attention K/V, ``[visual | text]``: k, v (B, Hkv, Nv + C, hd), valid (B, Nv + C)."""

    def __init__(self, shape: tuple[int, int, int, int], text_valid: torch.Tensor, dtype: torch.dtype):
        batch, n_kv_heads, n_visual, head_dim = shape
        capacity, device = text_valid.shape[1], text_valid.device
        self.n_visual = n_visual
        self.k = torch.zeros(batch, n_kv_heads, n_visual + capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.valid = torch.zeros(batch, n_visual + capacity, dtype=torch.bool, device=device)
        self.valid[:, n_visual:] = text_valid
        self.slots = torch.arange(n_visual + capacity, device=device)  # (Nv + C,)
        self.shift: torch.Tensor | None = None  # (B,) new tokens' positions are this much lower here

    def store_visual(self, k, v, valid, rows=None) -> None:
        """Prefill of an SA layer: the visual tokens' K/V (B', Hkv, Nv, hd) and validity (B', Nv)."""
        rows = slice(None) if rows is None else rows
        self.k[rows, :, : self.n_visual], self.v[rows, :, : self.n_visual] = k, v
        self.valid[rows, : self.n_visual] = valid

    def update(self, input_pos: int | torch.Tensor, k, v, rows=None):
        """Write text K/V (B', Hkv, n, hd) at text slots input_pos..input_pos+n; return the keys, values
        and validity (B, S) a query there attends over (see the module docstring)."""
        at = self.n_visual + input_pos
        if isinstance(input_pos, int):
            rows = slice(None) if rows is None else rows
            end = at + k.shape[2]
            self.k[rows, :, at:end], self.v[rows, :, at:end] = k, v
            return self.k[:, :, :end], self.v[:, :, :end], self.valid[:, :end]
        self.k.index_copy_(2, at, k)  # one slot, every row: a decode step
        self.v.index_copy_(2, at, v)
        return self.k, self.v, self.valid & (self.slots <= at)

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class KVCache:
    """All layers' K/V for one batch: ``layers[i]`` (``LayerKV``) and, at CA layers, ``cross[i]``
    (k, v (B, Hkv, Nv, hd), valid (B, Nv)). ``text_valid`` (B, C): the prompt's padding False, the
    slots of new tokens True. ``rope_offset`` (B,): a text slot's RoPE position minus its index."""

    def __init__(self, cfg, text_valid: torch.Tensor, capacity: int, dtype: torch.dtype):
        batch, n_text = text_valid.shape
        self.batch, self.capacity, self.dtype = batch, capacity, dtype
        self.n_kv_heads, self.head_dim = cfg.n_kv_heads, cfg.head_dim
        self.text_valid = torch.ones(batch, capacity, dtype=torch.bool, device=text_valid.device)
        self.text_valid[:, :n_text] = text_valid
        self.layers: list[LayerKV | None] = [None] * cfg.n_layers
        self.cross: list[tuple | None] = [None] * cfg.n_layers
        self.n_prompt = n_text  # text slots the prompt fills; new tokens follow from there
        self.rope_offset: torch.Tensor | None = None  # set by the prefill

    def open_layer(self, i: int, n_visual: int, shift: torch.Tensor | None = None) -> None:
        """Make layer i's buffers before its prefill: ``n_visual`` visual K/V in front of its text
        (the visual tokens present there if any sample runs it as SA, else 0); ``shift`` (B,): how far
        a token drop moved the positions of the text at this layer (PyramidDrop renumbers)."""
        shape = (self.batch, self.n_kv_heads, n_visual, self.head_dim)
        self.layers[i] = LayerKV(shape, self.text_valid, self.dtype)
        self.layers[i].shift = shift

    def store_cross(self, i: int, k, v, valid, rows=None) -> None:
        """A CA layer's K/V of the visual states (B', Hkv, Nv, hd) and their validity (B', Nv)."""
        if rows is None:
            self.cross[i] = (k, v, valid)
            return
        if self.cross[i] is None:
            shape = (self.batch, *k.shape[1:])
            self.cross[i] = (k.new_zeros(shape), v.new_zeros(shape), valid.new_zeros(self.batch, k.shape[2]))
        for buffer, new in zip(self.cross[i], (k, v, valid)):
            buffer[rows] = new

    def nbytes(self) -> int:
        """Bytes held by the K/V buffers."""
        own = sum(layer.nbytes() for layer in self.layers if layer is not None)
        return own + sum(t.numel() * t.element_size() for kv in self.cross if kv is not None for t in kv[:2])
