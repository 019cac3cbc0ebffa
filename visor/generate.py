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
from .layout import Context, Tokens
from .model import Prefilled, VisorLM

DECODE_MODES = ("dynamic", "static", "graph", "compile", "compile-graph")
PREFILL_MODES = ("eager", "graph", "compile", "compile-graph")


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    stop_on_eos: bool = True

    def __post_init__(self):
        checks.count("max_new_tokens", self.max_new_tokens, 1)
        checks.number("temperature", self.temperature, 0)
        checks.number("top_p", self.top_p, 0, 1, low_open=True)
        checks.count("seed", self.seed)


def modes(device: torch.device | str, prefill: str = "auto", decode: str = "auto") -> tuple[str, str]:
    """The prefill and decode modes to run on ``device``; "auto": compile-graph on CUDA (compiled
    kernels replayed as CUDA graphs, what ``visor bench`` measures), eager prefill and dynamic
    decode on the CPU."""
    cuda = checks.device(device).type == "cuda"
    prefill = ("compile-graph" if cuda else "eager") if prefill == "auto" else prefill
    decode = ("compile-graph" if cuda else "dynamic") if decode == "auto" else decode
    if prefill not in PREFILL_MODES:
        raise ConfigError(f"unknown prefill mode {prefill!r}; choose from auto, {', '.join(PREFILL_MODES)}")
    if decode not in DECODE_MODES:
        raise ConfigError(f"unknown decode mode {decode!r}; choose from auto, {', '.join(DECODE_MODES)}")
    for name, mode in (("prefill", prefill), ("decode", decode)):
        if mode.endswith("graph") and not cuda:
            raise ConfigError(f"{name} mode {mode!r} (CUDA graphs) needs a CUDA device")
    return prefill, decode


def bucket(n: int) -> int:
    """The padded length of n tokens: n rounded up to a multiple of an eighth of its power of two
    (at least of 16), so that a few shapes (compiled code, CUDA graphs) serve every prompt; the
    padding is under 16 tokens or 1/8 of n."""
    step = max(16, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


def collate(samples: list[Sample], image_token_id: int, device, buckets: bool = False) -> Tokens:
    """Split every sample into visual and text tokens with original positions; right-pad both
    (``buckets``: to ``bucket`` lengths, with the layout known: a fixed shape for compiled code)."""
    batch = len(samples)
    n_visual = max(s.visual.shape[0] for s in samples)
    n_text = max(len(s.ids) - s.visual.shape[0] for s in samples)
    if buckets:
        n_visual, n_text = bucket(n_visual) if n_visual else 0, bucket(n_text)
    hidden = samples[0].visual.shape[1]
    tok = Tokens(
        visual=torch.zeros(batch, n_visual, hidden, dtype=samples[0].visual.dtype, device=device),
        visual_pos=torch.zeros(batch, n_visual, dtype=torch.long, device=device),
        visual_valid=torch.zeros(batch, n_visual, dtype=torch.bool, device=device),
        text_ids=torch.zeros(batch, n_text, dtype=torch.long, device=device),
        text_pos=torch.zeros(batch, n_text, dtype=torch.long, device=device),
        text_valid=torch.zeros(batch, n_text, dtype=torch.bool, device=device),
    )
    if samples[0].positions is not None:  # multimodal RoPE
        tok.visual_rope = torch.zeros(batch, n_visual, 3, dtype=torch.long, device=device)
        tok.text_rope = torch.zeros(batch, n_text, dtype=torch.long, device=device)
    if samples[0].deepstack is not None:  # Qwen3-VL
        levels = samples[0].deepstack.shape[0]
        tok.deepstack = torch.zeros(levels, batch, n_visual, hidden, dtype=tok.visual.dtype, device=device)
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
        if s.positions is not None:
            rope = s.positions.to(device)
            tok.visual_rope[b, :nv] = rope[is_image]
            tok.text_rope[b, :nt] = rope[~is_image, 0]
        if s.deepstack is not None:
            tok.deepstack[:, b, :nv] = s.deepstack.to(device)
    if buckets:  # every slot laid out (the padding's stay empty): the shapes depend on the buckets only
        tok.layout = (n_visual + n_text, None)
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


def routed(budget) -> bool:
    """Whether the policy picks the budget (of the batch, or of some sample in it)."""
    return budget == "auto" or (isinstance(budget, (list, tuple)) and "auto" in budget)


def capture_graph(fn):
    """``fn()`` captured as a CUDA graph: run twice on a side stream first (as capture requires; the
    first call of compiled code compiles it), then captured. Returns (graph, what ``fn`` returned,
    living in the graph's memory: a replay rewrites it)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class Decoder:
    """Decode steps over one prefilled cache, ``decoder(token_ids) -> logits``. The decoder owns
    the position: ``pos``, the text slot the next token writes, counted from the prompt's end.

    Modes: ``dynamic`` attends over the slots filled so far; ``static`` over the whole
    preallocated cache with later slots masked (same shapes every step, no host sync);
    ``graph`` is ``static`` captured once as a CUDA graph and replayed (CUDA only: one launch per
    token instead of hundreds); ``compile`` is ``static`` through ``torch.compile`` (fused
    kernels); ``compile-graph`` captures the compiled step as a CUDA graph (fewest, fused kernels
    and no launch overhead: the fastest on a GPU). All give the same tokens. With the graph modes
    the returned logits live in a buffer the next step overwrites.
    """

    def __init__(self, lm: VisorLM, cache: KVCache, mode: str = "dynamic"):
        if mode not in DECODE_MODES:
            raise ConfigError(f"unknown decode mode {mode!r}; choose from {', '.join(DECODE_MODES)}")
        device = cache.text_valid.device
        if mode.endswith("graph") and device.type != "cuda":
            raise ConfigError(f"decode mode {mode!r} (CUDA graphs) needs a CUDA device")
        self.lm, self.cache, self.mode = lm, cache, mode
        self.pos = cache.n_prompt
        self.input_pos = torch.zeros(1, dtype=torch.long, device=device)  # pos, on the device (static modes)
        self.graph = None
        self.step = lm.decode_one_token
        if mode.startswith("compile"):  # one graph (a test holds it to fullgraph); past the recompile limit: eager
            self.step = torch.compile(lm.decode_one_token)

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.mode == "dynamic":
            logits = self.lm.decode_one_token(token_ids, self.cache, self.pos)
        else:
            self.input_pos.fill_(self.pos)
            if not self.mode.endswith("graph"):
                logits = self.step(token_ids, self.cache, self.input_pos)
            else:
                if self.graph is None:  # warm-up steps write this slot's K/V; the replay rewrites them
                    self.ids = token_ids.clone()
                    self.graph, self.logits = capture_graph(lambda: self.step(self.ids, self.cache, self.input_pos))
                self.ids.copy_(token_ids)
                self.graph.replay()
                logits = self.logits
        self.pos += 1
        return logits

    def restart(self) -> None:
        """Decode a new prompt whose prefill rewrote this decoder's cache in place (a graphed prefill's)."""
        self.pos = self.cache.n_prompt


class Prefill:
    """``prefill(tok) -> Prefilled`` for one budget and cache capacity.

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
    def __call__(self, tok: Tokens, drops: dict | None = None) -> Prefilled:
        if self.graphed is not None and not drops:
            return self.graphed(tok)
        with self.lm.compiled() if self.mode.startswith("compile") else contextlib.nullcontext():
            return self.lm.prefill(tok, self.budget, self.capacity, drops)


class GraphedPrefill:
    """``lm.prefill`` captured as a CUDA graph per input shape and layout, for one budget and
    capacity, and replayed for new inputs of a shape seen before (CUDA only). ``compiled``: capture
    the prefill with the layers' compiled pieces (``lm.compiled``). A prefill launches a thousand
    small kernels from Python, most of them for the text tokens; a replay launches them at once.
    A replay returns the cache of its shape with its buffers rewritten: finish decoding one
    prompt before prefilling the next.
    """

    FIELDS = ("visual", "visual_pos", "visual_valid", "text_ids", "text_pos", "text_valid")
    FIELDS += ("visual_rope", "text_rope", "deepstack")
    MAX_GRAPHS = 8  # shapes kept captured per budget and capacity

    def __init__(self, lm: VisorLM, budget, capacity: int, compiled: bool = False):
        if routed(budget):
            raise ConfigError("a CUDA-graph prefill needs a fixed budget ('auto' decides on the device's data)")
        self.lm, self.budget, self.capacity, self.compiled = lm, budget, capacity, compiled
        self.graphs: dict = {}  # (layout, shapes) -> [static inputs, graph, its Prefilled, its Decoder], newest last
        self.last = None  # the key of the last replay

    @torch.no_grad()
    def __call__(self, tok: Tokens) -> Prefilled:
        if not tok.text_ids.is_cuda:
            raise ConfigError("a CUDA-graph prefill needs a CUDA device")
        layout = tok.layout or Context.layout_of(tok)  # one host sync, unless the batch is bucketed
        fields = [f for f in self.FIELDS if getattr(tok, f) is not None]  # M-RoPE positions where the model has them
        key = (layout, *((f, getattr(tok, f).shape) for f in fields))
        if key not in self.graphs:
            if len(self.graphs) >= self.MAX_GRAPHS:  # each holds a memory pool: keep the newest few
                del self.graphs[next(iter(self.graphs))]
            static = Tokens(**{f: getattr(tok, f).clone() for f in fields}, layout=layout)
            with self.lm.compiled() if self.compiled else contextlib.nullcontext():
                graph, out = capture_graph(lambda: self.lm.prefill(static, self.budget, self.capacity))
            self.graphs[key] = [static, graph, out, None]
        static, graph, out, _ = self.graphs[key]
        for f in fields:
            getattr(static, f).copy_(getattr(tok, f))
        graph.replay()
        self.last = key
        return out

    def decoder(self, mode: str) -> Decoder:
        """The decoder of the last replay's cache: made once per shape, so its own CUDA graph is kept
        (and dropped with the prefill's graph)."""
        entry = self.graphs[self.last]
        if entry[3] is None:
            entry[3] = Decoder(self.lm, entry[2].cache, mode)
        entry[3].restart()
        return entry[3]


@dataclass
class Generated:
    tokens: list[list[int]]  # new token ids per sample (EOS included when reached, as Hugging Face does)
    budgets: list  # the budget each sample ran with
    prefill_seconds: float  # the batch's prefill


class Runner:
    """Prefill and decode of one model in chosen modes (``modes``), kept across calls: compiled code
    and CUDA graphs are reused by every batch of the same budget, capacity and bucket."""

    def __init__(self, lm: VisorLM, prefill: str = "auto", decode: str = "auto"):
        self.lm = lm
        self.prefill_mode, self.decode_mode = modes(lm.lm_head.weight.device, prefill, decode)
        self.asked = (prefill, decode)
        self.prefills: dict = {}  # (budget, capacity, mode) -> Prefill
        self.graphed: GraphedPrefill | None = None  # the last prefill's, where it was replayed from a graph

    @property
    def buckets(self) -> bool:
        """Pad prompts to bucket lengths (compiled prefills: a few shapes for every prompt)."""
        return self.prefill_mode != "eager"

    def prefill(self, tok: Tokens, budget, capacity: int, drops: dict | None = None) -> Prefilled:
        mode = self.prefill_mode
        if mode.endswith("graph") and (routed(budget) or drops) and self.asked[0] == "auto":
            mode = "compile"  # the budget is chosen, or tokens dropped, on the device's data: no graph
        key = (tuple(budget) if isinstance(budget, list) else budget, capacity, mode)
        if key not in self.prefills:
            self.prefills[key] = Prefill(self.lm, budget, capacity, mode)
        prefill = self.prefills[key]
        self.graphed = prefill.graphed if not drops else None
        return prefill(tok, drops)

    def decoder(self, cache: KVCache) -> Decoder:
        """The decoder of the last prefill's cache: a graphed prefill's cache keeps its decoder (and
        that decoder's CUDA graph); any other cache is new and gets a new one."""
        if self.graphed is not None:
            return self.graphed.decoder(self.decode_mode)
        mode = self.decode_mode  # a new cache: capturing a graph for it would be a capture per batch
        if mode.endswith("graph") and self.asked[1] == "auto":
            mode = "compile"
        return Decoder(self.lm, cache, mode)


@torch.no_grad()
def generate(
    runner: Runner, tok: Tokens, budget, cfg: GenerationConfig, eos_ids: set[int], drops: dict | None = None
) -> Generated:
    """Generate for a batch (``budget`` may be one for all, a list, or "auto")."""
    lm = runner.lm
    longest = int((tok.visual_valid.sum(1) + tok.text_valid.sum(1)).max())
    max_new = max(0, min(cfg.max_new_tokens, lm.cfg.max_positions - longest))  # stop at the context end
    batch, device = tok.text_ids.shape[0], tok.text_ids.device
    generator = None
    if cfg.temperature > 0:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    if max_new == 0:
        return Generated([[] for _ in range(batch)], [budget] * batch, 0.0)
    start = time.perf_counter()
    capacity = tok.text_ids.shape[1] + max_new
    capacity = bucket(capacity) if runner.buckets else capacity  # compiled paths: a few capacities too
    logits, cache, budgets, _ = runner.prefill(tok, budget, capacity, drops)
    if logits.is_cuda:
        torch.cuda.synchronize()
    prefill_seconds = time.perf_counter() - start
    decoder = runner.decoder(cache)
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
    return Generated(out, list(budgets), prefill_seconds)
