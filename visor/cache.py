"""The KV cache of a VISOR forward.

Text K/V live in every layer, in a buffer preallocated for the prompt plus the new tokens.
Visual K/V live only where a layer reads them: an active SA layer keeps its own K/V of the visual
tokens, a CA layer keeps its cross-attention K/V of the visual states (computed once at prefill).
Decode steps never touch visual *states* again, only these cached keys and values.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, text_valid: torch.Tensor, visual_valid: torch.Tensor, capacity: int):
        batch, n_text = text_valid.shape
        self.capacity = capacity
        self.length = 0  # text slots filled so far (the same for every sample; padding is masked)
        self.text_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=text_valid.device)  # (B, C)
        self.text_valid[:, :n_text] = text_valid
        self.visual_valid = visual_valid  # (B, Nv)
        self.text_k: list[torch.Tensor | None] = [None] * n_layers  # each (B, Hkv, C, hd)
        self.text_v: list[torch.Tensor | None] = [None] * n_layers
        self.visual_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers  # (B, Hkv, Nv, hd)
        self.next_pos: torch.Tensor | None = None  # (B,) position of each sample's next token
        self.plan: list[str] = []  # the role each layer played at prefill (decode must match)

    def write_text(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the text K/V of the current step at [length, length+n); return all filled slots."""
        if self.text_k[layer] is None:
            batch, heads, _, head_dim = k.shape
            shape = (batch, heads, self.capacity, head_dim)
            self.text_k[layer] = k.new_zeros(shape)
            self.text_v[layer] = v.new_zeros(shape)
        end = self.length + k.shape[2]
        self.text_k[layer][:, :, self.length : end] = k
        self.text_v[layer][:, :, self.length : end] = v
        return self.text_k[layer][:, :, :end], self.text_v[layer][:, :, :end]

    def text_mask(self, n_new: int) -> torch.Tensor:
        return self.text_valid[:, : self.length + n_new]  # (B, length + n_new)

    def advance(self, n: int) -> None:
        self.length += n
