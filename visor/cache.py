"""The KV cache of a VISOR forward.

Text K/V live in every layer, in a buffer preallocated for the prompt plus the new tokens.
Visual K/V live only where a layer reads them: an active SA layer keeps its own K/V of the visual
tokens, a CA layer keeps its cross-attention K/V of the visual states (computed once at prefill).
An SA layer's visual and text K/V share one buffer, ``[visual | text capacity]`` along the sequence,
so a decode step attends over one slice of it: nothing is concatenated per token.
Decode steps never touch visual *states* again, only these cached keys and values. In a batch
with per-sample budgets, a layer's visual K/V hold only the rows that use them; the mask of
the other rows is all False.

Decode steps come in two shapes. Dynamic: attention over the slots filled so far (shapes grow
by one each step). Static: attention over the whole preallocated buffer, the unfilled slots
masked, and the write position kept on the device (``slot``), so a step has the same shapes and
no host synchronisation every time: what CUDA graphs and ``torch.compile`` need.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, text_valid: torch.Tensor, capacity: int):
        batch, n_text = text_valid.shape
        self.capacity = capacity
        self.length = 0  # text slots filled so far (the same for every sample; padding is masked)
        self.slot = torch.zeros(1, dtype=torch.long, device=text_valid.device)  # == length, on the device
        self.text_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=text_valid.device)  # (B, C)
        self.text_valid[:, :n_text] = text_valid
        self.batch = batch
        self.text_k: list[torch.Tensor | None] = [None] * n_layers  # each (B, Hkv, C, hd)
        self.text_v: list[torch.Tensor | None] = [None] * n_layers
        self.sa_buffer: list[tuple | None] = [None] * n_layers  # each ((B, Hkv, Nv + C, hd), same): [visual | text]
        self.sa_valid: list[torch.Tensor | None] = [None] * n_layers  # each (B, Nv + C): [visual | text] validity
        self.ca_kv: list[tuple | None] = [None] * n_layers
        self.ca_mask: list[torch.Tensor | None] = [None] * n_layers
        self.next_pos: torch.Tensor | None = None  # (B,) position of each sample's next token
        self.budgets: list = []  # the budget each sample ran with at prefill

    def write_text(self, layer: int, k, v, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the text K/V of the current step at [length, length+n); return all filled slots."""
        if self.text_k[layer] is None:
            shape = (self.text_valid.shape[0], k.shape[1], self.capacity, k.shape[3])
            self.text_k[layer], self.text_v[layer] = k.new_zeros(shape), v.new_zeros(shape)
        end = self.length + k.shape[2]
        if rows is None:
            self.text_k[layer][:, :, self.length : end] = k
            self.text_v[layer][:, :, self.length : end] = v
        else:
            self.text_k[layer][rows, :, self.length : end] = k
            self.text_v[layer][rows, :, self.length : end] = v
        return self.text_k[layer][:, :, :end], self.text_v[layer][:, :, :end]

    def write_slot(self, layer: int, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        """Static decode: store one step's text K/V (B, Hkv, 1, hd) at ``slot``; return the whole buffers."""
        self.text_k[layer].index_copy_(2, self.slot, k)
        self.text_v[layer].index_copy_(2, self.slot, v)
        return self.text_k[layer], self.text_v[layer]

    def store_visual(self, kind: str, layer: int, k, v, valid, rows: torch.Tensor | None = None) -> None:
        """Keep a layer's visual K/V ("sa": its own, "ca": its cross-attention's) for decoding, with
        the validity of the visual tokens present at that layer (B, Nv_layer). An SA layer's go to the
        front of the buffer its text K/V follow in (called before ``write_text`` for that layer)."""
        if kind == "sa":
            self._store_sa(layer, k, v, valid, rows)
            return
        kvs, masks = self.ca_kv, self.ca_mask
        if rows is None:
            kvs[layer], masks[layer] = (k, v), valid
            return
        if kvs[layer] is None:
            shape = (self.batch, *k.shape[1:])
            kvs[layer] = (k.new_zeros(shape), v.new_zeros(shape))
            masks[layer] = torch.zeros(self.batch, k.shape[2], dtype=torch.bool, device=k.device)
        kvs[layer][0][rows], kvs[layer][1][rows] = k, v
        masks[layer][rows] = valid

    def _store_sa(self, layer: int, k, v, valid, rows) -> None:
        n_visual = k.shape[2]
        if self.sa_buffer[layer] is None:
            shape = (self.batch, k.shape[1], n_visual + self.capacity, k.shape[3])
            self.sa_buffer[layer] = (k.new_zeros(shape), v.new_zeros(shape))
            self.text_k[layer], self.text_v[layer] = (b[:, :, n_visual:] for b in self.sa_buffer[layer])
            self.sa_valid[layer] = torch.zeros(self.batch, n_visual + self.capacity, dtype=torch.bool, device=k.device)
            self.sa_valid[layer][:, n_visual:] = self.text_valid
        rows = slice(None) if rows is None else rows
        buffer_k, buffer_v = self.sa_buffer[layer]
        buffer_k[rows, :, :n_visual], buffer_v[rows, :, :n_visual] = k, v
        self.sa_valid[layer][rows, :n_visual] = valid

    def sa_keys_values(self, layer: int, n_text: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """An SA layer's visual K/V and its first n_text text slots, and their validity (B, Nv + n_text):
        views of its buffers."""
        end = self.sa_valid[layer].shape[1] - self.capacity + n_text  # Nv + n_text
        k, v = self.sa_buffer[layer]
        return k[:, :, :end], v[:, :, :end], self.sa_valid[layer][:, :end]

    def mark_filled(self, static: bool) -> None:
        """The slot a decode step writes becomes valid, in the text mask and every SA layer's."""
        masks = [self.text_valid] + [m[:, m.shape[1] - self.capacity :] for m in self.sa_valid if m is not None]
        for mask in masks:
            if static:
                mask.index_fill_(1, self.slot, True)
            else:
                mask[:, self.length] = True

    def bookkeeping(self) -> list[torch.Tensor]:
        """What a decode step changes besides K/V: the write slot, the next positions, the validity masks."""
        return [self.slot, self.next_pos, self.text_valid, *(m for m in self.sa_valid if m is not None)]

    def text_mask(self, n_new: int) -> torch.Tensor:
        return self.text_valid[:, : self.length + n_new]  # (B, length + n_new)

    def advance(self, n: int) -> None:
        self.length += n
        self.slot.fill_(self.length)

    def nbytes(self) -> int:
        """Bytes held by the cache's K/V buffers."""
        own = [kv for kv in self.sa_buffer + self.ca_kv if kv is not None]  # SA buffers hold their text K/V
        own += [(k, v) for k, v, sa in zip(self.text_k, self.text_v, self.sa_buffer) if k is not None and sa is None]
        return sum(t.numel() * t.element_size() for kv in own for t in kv)
