"""Batched, KV-cached generation: collate prompts, prefill once, decode token by token."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from . import checks
from .backbone import Sample
from .cache import KVCache
from .errors import ConfigError
from .model import Context, Tokens, VisorLM

DECODE_MODES = ("dynamic", "static", "graph", "compile", "compile-graph")
PREFILL_MODES = ("eager", "graph", "compile", "compile-graph")


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    stop_on_eos: bool = True
    decode: str = "dynamic"  # one of DECODE_MODES, see Decoder

    def __post_init__(self):
        checks.count("max_new_tokens", self.max_new_tokens, 1)
        checks.number("temperature", self.temperature, 0)
        checks.number("top_p", self.top_p, 0, 1, low_open=True)
        checks.count("seed", self.seed)
        if self.decode not in DECODE_MODES:
            raise ConfigError(f"unknown decode mode {self.decode!r}; choose from {', '.join(DECODE_MODES)}")


def collate(samples: list[Sample], image_token_id: int, device) -> Tokens:
    """Split every sample into visual and text tokens with original positions; right-pad both."""
    batch = len(samples)
    n_visual = max(s.visual.shape[0] for s in samples)
    n_text = max(len(s.ids) - s.visual.shape[0] for s in samples)
    hidden = samples[0].visual.shape[1]
    tok = Tokens(
        visual=torch.zeros(batch, n_visual, hidden, dtype=samples[0].visual.dtype, device=device),
        visual_pos=torch.zeros(batch, n_visual, dtype=torch.long, device=device),
        visual_valid=torch.zeros(batch, n_visual, dtype=torch.bool, device=device),
        text_ids=torch.zeros(batch, n_text, dtype=torch.long, device=device),
        text_pos=torch.zeros(batch, n_text, dtype=torch.long, device=device),
        text_valid=torch.zeros(batch, n_text, dtype=torch.bool, device=device),
    )
    for b, s in enumerate(samples):
        ids = torch.tensor(s.ids, device=device)
        pos = torch.arange(len(s.ids), device=device)
        is_image = ids == image_token_id
        nv, nt = int(is_image.sum()), int((~is_image).sum())
        tok.visual[b, :nv] = s.visual.to(device)
        tok.visual_pos[b, :nv] = pos[is_image]
        tok.visual_valid[b, :nv] = True
        tok.text_ids[b, :nt] = ids[~is_image]
        tok.text_pos[b, :nt] = pos[~is_image]
        tok.text_valid[b, :nt] = True
    return tok


def pick_next(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy at temperature 0, else nucleus (top-p) sampling. logits (B, V) -> (B,)."""
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / cfg.temperature, -1)
    if cfg.top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > cfg.top_p  # keep the smallest set reaching top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class Decoder:
    """Decode steps over one prefilled cache, ``decoder(token_ids) -> logits``.

    Modes: ``dynamic`` attends over the slots filled so far; ``static`` over the whole
    preallocated cache with unfilled slots masked (same shapes every step, no host sync);
    ``graph`` is ``static`` captured once as a CUDA graph and replayed (CUDA only: one launch per
    token instead of hundreds); ``compile`` is ``static`` through ``torch.compile`` (fused
    kernels); ``compile-graph`` captures the compiled step as a CUDA graph (fewest, fused kernels
    and no launch overhead: the fastest on a GPU). All give the same tokens. With the graph modes
    the returned logits live in a buffer the next step overwrites.
    """

    def __init__(self, lm: VisorLM, cache: KVCache, mode: str = "dynamic"):
        if mode not in DECODE_MODES:
            raise ConfigError(f"unknown decode mode {mode!r}; choose from {', '.join(DECODE_MODES)}")
        if mode.endswith("graph") and not cache.slot.is_cuda:
            raise ConfigError(f"decode mode {mode!r} (CUDA graphs) needs a CUDA device")
        self.lm, self.cache, self.mode = lm, cache, mode
        self.graph = None
        self.step = lm.decode_one_token
        if mode.startswith("compile"):  # one graph (a test holds it to fullgraph); past the recompile limit: eager
            self.step = torch.compile(lm.decode_one_token)

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.mode == "dynamic":
            return self.lm.decode_one_token(token_ids, self.cache)
        if not self.mode.endswith("graph"):
            logits = self.step(token_ids, self.cache, static=True)
        else:
            if self.graph is None:
                self._capture(token_ids)
            self.ids.copy_(token_ids)
            self.graph.replay()
            logits = self.logits
        self.cache.length += 1  # the step advanced the device-side slot; keep the host's count
        return logits

    def _capture(self, token_ids: torch.Tensor) -> None:
        cache = self.cache
        saved = [t.clone() for t in cache.bookkeeping()]

        def restore():  # undo a step's bookkeeping; its K/V write is overwritten by the real step
            for t, before in zip(cache.bookkeeping(), saved):
                t.copy_(before)

        self.ids = token_ids.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up off the default stream, as capture requires
            for _ in range(2):  # (the first call of a compiled step compiles it)
                self.step(self.ids, cache, static=True)
                restore()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.step(self.ids, cache, static=True)
        restore()


class Prefill:
    """``prefill(tok) -> (logits, cache)`` for one budget and cache capacity.

    Modes: ``eager`` is ``lm.prefill``; ``graph`` replays it as a CUDA graph (``GraphedPrefill``);
    ``compile`` runs each layer's pieces through ``torch.compile`` (``lm.compiled``);
    ``compile-graph`` captures the compiled prefill as a CUDA graph (fewest, fused kernels and no
    launch overhead: the fastest on a GPU). All give the same logits and cache.
    """

    def __init__(self, lm: VisorLM, budget, capacity: int, mode: str = "eager"):
        if mode not in PREFILL_MODES:
            raise ConfigError(f"unknown prefill mode {mode!r}; choose from {', '.join(PREFILL_MODES)}")
        if mode.endswith("graph") and not lm.lm_head.weight.is_cuda:
            raise ConfigError(f"prefill mode {mode!r} (CUDA graphs) needs a CUDA device")
        self.lm, self.budget, self.capacity, self.mode = lm, budget, capacity, mode
        compiled = mode.startswith("compile")
        self.graphed = GraphedPrefill(lm, budget, capacity, compiled) if mode.endswith("graph") else None

    @torch.no_grad()
    def __call__(self, tok: Tokens) -> tuple[torch.Tensor, KVCache]:
        if self.graphed is not None:
            return self.graphed(tok)
        with self.lm.compiled() if self.mode == "compile" else contextlib.nullcontext():
            return self.lm.prefill(tok, self.budget, self.capacity)


class GraphedPrefill:
    """``lm.prefill`` captured as a CUDA graph for one input shape and layout, budget and
    capacity, and replayed for new inputs of that shape (CUDA only; another shape recaptures).
    ``compiled``: capture the prefill with the layers' compiled pieces (``lm.compiled``).
    A prefill launches a thousand small kernels from Python, most of them for the text tokens;
    a replay launches them at once. Every call returns the same cache object with its buffers
    rewritten: finish decoding one prompt before prefilling the next.
    """

    FIELDS = ("visual", "visual_pos", "visual_valid", "text_ids", "text_pos", "text_valid")

    def __init__(self, lm: VisorLM, budget, capacity: int, compiled: bool = False):
        if budget == "auto":
            raise ConfigError("a CUDA-graph prefill needs a fixed budget ('auto' decides on the device's data)")
        self.lm, self.budget, self.capacity, self.compiled = lm, budget, capacity, compiled
        self.graph, self.key = None, None

    @torch.no_grad()
    def __call__(self, tok: Tokens) -> tuple[torch.Tensor, KVCache]:
        if not tok.text_ids.is_cuda:
            raise ConfigError("a CUDA-graph prefill needs a CUDA device")
        layout = Context.layout_of(tok)  # one host sync
        key = (layout, *(getattr(tok, f).shape for f in self.FIELDS))
        if key != self.key:
            with self.lm.compiled() if self.compiled else contextlib.nullcontext():
                self._capture(tok, layout)
            self.key = key
        for f in self.FIELDS:
            getattr(self.static, f).copy_(getattr(tok, f))
        self.graph.replay()
        self.cache.length, self.cache.budgets = self.length, list(self.budgets)  # undo the last decode's
        return self.logits, self.cache

    def _capture(self, tok: Tokens, layout: tuple) -> None:
        self.static = Tokens(*(getattr(tok, f).clone() for f in self.FIELDS), layout=layout)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up off the default stream, as capture requires
            for _ in range(2):
                self.lm.prefill(self.static, self.budget, self.capacity)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits, self.cache = self.lm.prefill(self.static, self.budget, self.capacity)
        self.length, self.budgets = self.cache.length, list(self.cache.budgets)


@torch.no_grad()
def generate(
    lm: VisorLM,
    tok: Tokens,
    budget,
    cfg: GenerationConfig,
    eos_ids: set[int],
    drops: dict | None = None,
    stats: dict | None = None,
) -> tuple[list[list[int]], list]:
    """New token ids per sample (EOS included when reached, as Hugging Face does) and the budget
    each sample ran with (``budget`` may be one for all, a list, or "auto"). ``stats`` receives
    the prefill time in seconds ("prefill_s", added up over calls)."""
    longest = int((tok.visual_valid.sum(1) + tok.text_valid.sum(1)).max())
    max_new = max(0, min(cfg.max_new_tokens, lm.cfg.max_positions - longest))  # stop at the context end
    batch, device = tok.text_ids.shape[0], tok.text_ids.device
    generator = None
    if cfg.temperature > 0:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    if max_new == 0:
        return [[] for _ in range(batch)], [budget] * batch
    start = time.perf_counter()
    logits, cache = lm.prefill(tok, budget, capacity=tok.text_ids.shape[1] + max_new, drops=drops)
    if stats is not None:
        if logits.is_cuda:
            torch.cuda.synchronize()
        stats["prefill_s"] = stats.get("prefill_s", 0.0) + time.perf_counter() - start
    decoder = Decoder(lm, cache, cfg.decode)
    finished = [False] * batch
    out: list[list[int]] = [[] for _ in range(batch)]
    for step in range(max_new):
        next_ids = pick_next(logits, cfg, generator)
        for b, token in enumerate(next_ids.tolist()):  # the one host sync per token
            if not finished[b]:
                out[b].append(token)
                finished[b] = cfg.stop_on_eos and token in eos_ids
        if all(finished) or step == max_new - 1:
            break
        logits = decoder(next_ids)
    return out, cache.budgets
