"""`visor bench`: wall-clock of every inference phase, VISOR vs. Hugging Face, on the same weights.

The model is built at a real shape with random weights directly on the device (``--size``, or
``--config`` for any config.json; nothing is downloaded), or loaded from a checkpoint
(``--model``). A prompt is ``text_tokens`` text tokens with ``visual_tokens`` image tokens after
the first few; the vision encoder (tower + projector) is timed on the crops that yield that many
tokens. For each method, each a median over ``repeats`` runs after ``warmup`` runs:

    vision_ms      vision tower + projector on the crops
    prefill_ms     language-model prefill (all layers, KV cache filled, last token's logits);
                   on CUDA ours is compiled and replayed as a CUDA graph (``--prefill`` to change)
    ttft_ms        time to first token: vision + prefill + picking the token
    decode_ms      per new token after the second (greedy, cached, no host sync inside the loop)
    first_step_ms  the first decode step, which also sets decoding up (compiles, captures the CUDA graph)
    peak_memory_bytes, kv_cache_bytes, FLOPs per phase (visor.flops) and achieved TFLOP/s,
    speed-ups over ``hf`` and ``full`` measured in the same run, and for ``full`` the greedy tokens
    and prefill logits against ``hf`` (same_tokens_as_hf, prefill_logits_diff_vs_hf: max |diff|
    over max |logit|).

    serving       prefill and decode tokens/s, requests/s at this batch, KV-cache bytes per request,
                  requests whose caches fit in ``memory_budget_gib``, decode bytes per step (weights
                  + KV cache) and GB/s against the device's measured copy bandwidth (decode_vs_bound)

Methods: ``hf`` (transformers' own language model, its attention implementation and dynamic
cache), ``hf-compile`` (transformers' documented fast path: a static cache and a torch.compile'd
decode step, CUDA graphs on a GPU), ``full`` (our forward, every layer full self-attention) and
``visor:K`` (budget K). Speed-ups are given against ``hf``, the fastest transformers method of the
run phase by phase (``speedup_vs_best_hf``) and ``full``.
"""

from __future__ import annotations

import inspect
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from functools import partial
from importlib import resources
from pathlib import Path

import torch

from .errors import ConfigError

SIZES = {  # (architecture, size) -> a config in visor/configs
    ("llava-onevision", "0.5b"): "llava-onevision-qwen2-0.5b.json",
    ("llava-onevision", "7b"): "llava-onevision-qwen2-7b.json",
    ("qwen2-vl", "7b"): "qwen2-vl-7b.json",
    ("qwen2.5-vl", "3b"): "qwen2.5-vl-3b.json",
    ("qwen2.5-vl", "7b"): "qwen2.5-vl-7b.json",
    ("qwen3-vl", "8b"): "qwen3-vl-8b.json",
    ("internvl", "8b"): "internvl3-8b.json",
}
TIMES = ("vision_ms", "prefill_ms", "ttft_ms", "decode_ms", "first_step_ms")


@dataclass
class BenchConfig:
    size: str = "0.5b"  # a built-in shape of `arch` (SIZES)
    arch: str = "llava-onevision"
    config: str = ""  # or any config.json (random weights)
    model: str = ""  # or a checkpoint directory (its weights)
    visual_tokens: int = 7290
    text_tokens: int = 64
    new_tokens: int = 32
    batch: int = 1
    methods: str = "hf,full,visor:2"
    repeats: int = 5
    warmup: int = 2
    device: str = "auto"  # cuda if available, else cpu
    dtype: str = "auto"  # bfloat16 on CUDA, float32 on CPU
    decode: str = "auto"  # visor decode mode (visor.generate.DECODE_MODES); auto: compile-graph on CUDA, else dynamic
    prefill: str = "auto"  # visor prefill mode (visor.generate.PREFILL_MODES); auto: compile-graph on CUDA, else eager
    schedule: str = ""  # a schedule spec for random-weight models ("" = the default rule)
    seed: int = 0
    memory_budget_gib: float = 40.0  # serving: how many requests' KV caches fit in this much memory


def builtin_config(size: str, arch: str = "llava-onevision") -> Path:
    if (arch, size) not in SIZES:
        known = ", ".join(f"--arch {a} --size {s}" for a, s in SIZES)
        raise ConfigError(f"no built-in shape for --arch {arch} --size {size}; choose from {known}, or pass --config")
    return Path(str(resources.files("visor") / "configs" / SIZES[arch, size]))


def parse_methods(spec: str, schedule) -> list[tuple[str, object]]:
    """'hf,full,visor:2' -> [("hf", "full"), ("full", "full"), ("visor:2", 2)] (and "hf-compile")."""
    methods = []
    for name in (m.strip() for m in spec.split(",") if m.strip()):
        if name in ("hf", "hf-compile", "full"):
            methods.append((name, "full"))
        elif name.startswith("visor:"):
            methods.append((name, schedule.parse_budget(name.split(":", 1)[1])))
        else:
            raise ConfigError(
                f"unknown method {name!r}: use hf, hf-compile, full or visor:K (K a budget of the schedule)"
            )
    if not methods:
        raise ConfigError("--methods is empty")
    return methods


class Clock:
    """Wall-clock of a block, with the device synchronised at both ends."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn):
        if self.cuda:
            torch.cuda.synchronize()
        began = time.perf_counter()
        out = fn()
        if self.cuda:
            torch.cuda.synchronize()
        return out, 1e3 * (time.perf_counter() - began)


def build(cfg: BenchConfig, device: torch.device, dtype: torch.dtype):
    """(HF model, VisorLM) with random weights at the config's shape, or a checkpoint's."""
    import transformers

    from .api import load
    from .backbone import ARCHITECTURES, read_config
    from .model import VisorLM
    from .schedule import Schedule

    if cfg.model:
        model = load(cfg.model, schedule=cfg.schedule or None, dtype=dtype, device=str(device))
        return model.backbone.hf, model.lm
    config = read_config(cfg.config or builtin_config(cfg.size, cfg.arch))
    hf_cls = getattr(transformers, ARCHITECTURES[config.model_type])
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        hf = hf_cls._from_config(config, attn_implementation="sdpa", dtype=dtype)
    hf.eval()
    schedule = Schedule.from_spec(cfg.schedule or None, config.text_config.num_hidden_layers)
    lm = VisorLM(hf, schedule).to(device)
    for ca in lm.cross.values():  # a trained model's gates are not zero: let CA change the states
        torch.nn.init.constant_(ca.gate, 0.5)
    return hf, lm


def dynamic_vision_encoder(hf, grids: list, device, dtype):
    """A dynamic-resolution tower + merger (Qwen-VL) on random images of these (t, h, w) patch grids."""
    vc = hf.config.vision_config
    width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), width, device=device, dtype=dtype)
    grid_thw = torch.tensor(grids, device=device)
    return lambda: hf.model.get_image_features(pixels, grid_thw).pooler_output


def vision_encoder(hf, n_crops: int, device, dtype):
    """Tower + projector on n_crops random crops, as the checkpoint's feature selection does."""
    from .backbone import select_features

    vc = hf.config.vision_config
    pixels = torch.randn(n_crops, vc.num_channels, vc.image_size, vc.image_size, device=device, dtype=dtype)
    tower, projector = hf.model.vision_tower, hf.model.multi_modal_projector

    def run():
        return projector(select_features(hf.config, tower(pixels, output_hidden_states=True).hidden_states))

    return run


def prompt(lm, cfg: BenchConfig, device, dtype):
    """Tokens of a batch of identical-length prompts: 5 text tokens, the image, the rest."""
    from .model import Tokens

    n_v, n_t, b = cfg.visual_tokens, cfg.text_tokens, cfg.batch
    positions = torch.arange(n_v + n_t, device=device)
    image_at = min(5, n_t)
    is_visual = (positions >= image_at) & (positions < image_at + n_v)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    return Tokens(
        visual=torch.randn(b, n_v, lm.cfg.hidden, generator=gen, device=device).to(dtype),
        visual_pos=positions[is_visual].expand(b, -1),
        visual_valid=torch.ones(b, n_v, dtype=torch.bool, device=device),
        text_ids=torch.randint(0, lm.cfg.vocab, (b, n_t), generator=gen, device=device),
        text_pos=positions[~is_visual].expand(b, -1),
        text_valid=torch.ones(b, n_t, dtype=torch.bool, device=device),
    )


class Ours:
    """VISOR through the path ``VisorModel.generate`` takes (``visor.generate.Runner``)."""

    def __init__(self, lm, budget, capacity: int, decode: str, prefill: str):
        from .generate import Runner

        self.runner, self.budget, self.capacity = Runner(lm, prefill, decode), budget, capacity

    def prefill(self, tok):
        return self.runner.prefill(tok, self.budget, self.capacity)

    def generate(self, tok):
        """Prefill; returns (token ids so far, one decode step, KV-cache bytes)."""
        logits, cache, _, _ = self.prefill(tok)
        decoder = self.runner.decoder(cache)
        ids = [logits.argmax(-1)]
        return ids, lambda: ids.append(decoder(ids[-1]).argmax(-1)), cache.nbytes()


class HF:
    """transformers' own language model: inputs_embeds in the original order, its dynamic cache."""

    def __init__(self, hf):
        self.hf, self.lm = hf, hf.model.language_model
        # transformers renamed `past_key_values` to `cache` (5.2x); use whichever this version has
        self.cache_name = "cache" if "cache" in inspect.signature(self.lm.forward).parameters else "past_key_values"

    def prefill(self, tok):
        emb = self.embeddings(tok)
        out = self.lm(inputs_embeds=emb, use_cache=True)
        return self.hf.lm_head(out.last_hidden_state[:, -1]), getattr(out, self.cache_name)

    def embeddings(self, tok):
        text = self.hf.get_input_embeddings()(tok.text_ids)
        b, n = text.shape[0], tok.visual.shape[1] + text.shape[1]
        emb = text.new_zeros(b, n, text.shape[2])
        emb[:, tok.visual_pos[0]] = tok.visual.to(text.dtype)
        emb[:, tok.text_pos[0]] = text
        return emb

    def generate(self, tok):
        logits, cache = self.prefill(tok)
        ids = [logits.argmax(-1)]
        embed = self.hf.get_input_embeddings()

        def step():
            out = self.lm(inputs_embeds=embed(ids[-1][:, None]), use_cache=True, **{self.cache_name: cache})
            ids.append(self.hf.lm_head(out.last_hidden_state[:, -1]).argmax(-1))

        return ids, step, sum(t.numel() * t.element_size() for t in hf_cache_tensors(cache))


class HFCompiled(HF):
    """transformers' documented fast path: a static KV cache (``StaticCache``, preallocated) and the
    decode step through ``torch.compile`` (on CUDA ``mode="reduce-overhead"``: CUDA graphs)."""

    def __init__(self, hf, capacity: int):
        super().__init__(hf)
        self.capacity, self.caches = capacity, {}  # new tokens the cache has room for; caches by shape
        mode = "reduce-overhead" if hf.device.type == "cuda" else None
        self.step_fn = torch.compile(self.step_logits, mode=mode)

    def prefill(self, tok):
        from transformers import StaticCache

        emb = self.embeddings(tok)
        shape = (emb.shape[0], emb.shape[1] + self.capacity)
        if shape in self.caches:  # one cache per shape, reset between requests, as generate() reuses its own
            cache = self.caches[shape]
            cache.reset()
        else:
            accepted = inspect.signature(StaticCache.__init__).parameters  # some 5.x releases size it up front
            upfront = dict(max_batch_size=shape[0], device=emb.device, dtype=emb.dtype)
            upfront = {k: v for k, v in upfront.items() if k in accepted}
            cache = self.caches[shape] = StaticCache(config=self.hf.config, max_cache_len=shape[1], **upfront)
        out = self.lm(inputs_embeds=emb, use_cache=True, **{self.cache_name: cache})
        return self.hf.lm_head(out.last_hidden_state[:, -1]), cache

    def step_logits(self, ids, cache, position):
        out = self.lm(inputs_embeds=self.hf.get_input_embeddings()(ids), position_ids=position, use_cache=True,
                      **{self.cache_name: cache})  # fmt: skip
        return self.hf.lm_head(out.last_hidden_state[:, -1])

    def generate(self, tok):
        logits, cache = self.prefill(tok)
        ids = [logits.argmax(-1)]
        position = torch.full((ids[0].shape[0], 1), tok.visual.shape[1] + tok.text_ids.shape[1], device=logits.device)

        def step():
            ids.append(self.step_fn(ids[-1][:, None], cache, position).argmax(-1))
            position.add_(1)  # in place: the compiled step sees one tensor, no recompilation

        return ids, step, sum(t.numel() * t.element_size() for t in hf_cache_tensors(cache))


def hf_cache_tensors(cache) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor)]


@torch.no_grad()
def run_bench(cfg: BenchConfig, progress=None) -> dict:
    """Time every method; returns the JSON-ready result (see the module docstring)."""
    import transformers

    from . import __version__, checks
    from .flops import DYNAMIC, count_flops, decode_flops, square_grid
    from .generate import modes

    if cfg.visual_tokens < 0 or cfg.text_tokens < 1 or cfg.new_tokens < 3:
        raise ConfigError("need --visual-tokens >= 0, --text-tokens >= 1 and --new-tokens >= 3")
    if cfg.repeats < 1 or cfg.warmup < 0 or cfg.batch < 1:
        raise ConfigError("need --repeats >= 1, --warmup >= 0 and --batch >= 1")
    device = checks.device(cfg.device)
    dtype = checks.dtype(cfg.dtype, device)
    dtype_name = checks.dtype_name(dtype)
    prefill, decode = modes(device, cfg.prefill, cfg.decode)

    hf, lm = build(cfg, device, dtype)
    methods = parse_methods(cfg.methods, lm.schedule)
    if cfg.visual_tokens + cfg.text_tokens + cfg.new_tokens > lm.cfg.max_positions:
        raise ConfigError(f"{cfg.visual_tokens + cfg.text_tokens + cfg.new_tokens} tokens exceed the model's context")
    vc = hf.config.vision_config
    if vc.model_type in DYNAMIC:  # one image per sample, its grid as square as the token count allows
        grids = square_grid(cfg.visual_tokens, vc.spatial_merge_size)
        n_crops = len(grids)
        vision = dynamic_vision_encoder(hf, grids * cfg.batch, device, dtype)
    elif vc.model_type == "internvl_vision":  # 448-pixel tiles, pixel-shuffled to image_seq_length tokens each
        grids, n_crops = None, math.ceil(cfg.visual_tokens / hf.config.image_seq_length)
        side = vc.image_size[0]
        pixels = torch.randn(n_crops * cfg.batch, vc.num_channels, side, side, device=device, dtype=dtype)
        vision = lambda: hf.model.get_image_features(pixels).pooler_output  # noqa: E731
    else:
        grids, per_crop = None, (vc.image_size // vc.patch_size) ** 2
        n_crops = math.ceil(cfg.visual_tokens / per_crop)  # per sample
        vision = vision_encoder(hf, n_crops * cfg.batch, device, dtype)
    tok = prompt(lm, cfg, device, dtype)
    progress = progress or (lambda name, i: None)
    capacity = cfg.text_tokens + cfg.new_tokens

    rows, logits = [], {}
    copy_bw = copy_bandwidth(device)
    for name, budget in methods:
        if name == "hf":
            runner = HF(hf)
        elif name == "hf-compile":
            runner = HFCompiled(hf, cfg.new_tokens)
        else:
            runner = Ours(lm, budget, capacity, decode, prefill)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        timed = time_method(runner, vision, tok, cfg, Clock(device), partial(progress, name))
        samples, ids, kv_bytes, logits[name] = timed
        flop_budget = "full" if name.startswith("hf") else budget
        n_v, n_t = cfg.visual_tokens, cfg.text_tokens
        report = count_flops(hf.config, lm.schedule, flop_budget, n_v, n_t, n_crops, None, grids)
        step_flops = decode_flops(hf.config, lm.schedule, flop_budget, n_v, n_t, cfg.new_tokens) // (cfg.new_tokens - 1)
        flops = {
            "vision": cfg.batch * (report.prefill - report.lm_prefill) if n_crops else 0,
            "lm_prefill": cfg.batch * report.lm_prefill,
            "decode_per_token": cfg.batch * step_flops,
        }
        times = {k: statistics.median(v) for k, v in samples.items()}
        rows.append(
            {
                "method": name,
                "budget": budget,
                **{k: round(v, 4) for k, v in times.items()},
                "spread_ms": {k: [round(min(v), 4), round(max(v), 4)] for k, v in samples.items()},
                "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                "kv_cache_bytes": kv_bytes,
                "flops": flops,
                "tflops_per_s": {
                    "vision": _rate(flops["vision"], times["vision_ms"]),
                    "prefill": _rate(flops["lm_prefill"], times["prefill_ms"]),
                    "decode": _rate(flops["decode_per_token"], times["decode_ms"]),
                },
                "tokens": ids,
                "serving": serving(cfg, times, kv_bytes, decode_weight_bytes(hf, lm, name, budget), copy_bw),
            }
        )
    by_name = {r["method"]: r for r in rows}
    hf_rows = [r for r in rows if r["method"].startswith("hf")]  # the fastest transformers path, phase by phase
    references = {
        "hf": by_name.get("hf"),
        "best_hf": {k: min(r[k] for r in hf_rows) for k in TIMES} if hf_rows else None,
        "full": by_name.get("full"),
    }
    for name, ref in references.items():
        for row in rows:
            row[f"speedup_vs_{name}"] = (
                None if ref is None else {k: round(ref[k] / row[k], 3) if row[k] else None for k in TIMES}
            )
    hf_row = references["hf"]
    for row in rows:  # random bf16 weights give near-ties between logits: tokens may differ where logits agree
        comparable = hf_row is not None and row["budget"] == "full"
        row["same_tokens_as_hf"] = row["tokens"] == hf_row["tokens"] if comparable else None
        if comparable:
            diff = (logits[row["method"]] - logits["hf"]).abs().max() / logits["hf"].abs().max()
        row["prefill_logits_diff_vs_hf"] = round(diff.item(), 6) if comparable else None
    cpu = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "versions": {"visor": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "config": asdict(cfg)
        | {"device": str(device), "dtype": dtype_name, "decode": decode, "prefill": prefill}
        | {"crops_per_sample": n_crops, "copy_gb_per_s": round(copy_bw / 1e9, 1)},
        "model": {
            "layers": lm.cfg.n_layers,
            "hidden": lm.cfg.hidden,
            "schedule": lm.schedule.to_dict(),
            "parameters": sum(p.numel() for p in hf.parameters()),
        },
        "methods": rows,
    }


def time_method(runner, vision, tok, cfg: BenchConfig, clock: Clock, progress) -> tuple:
    """Per-phase times of every timed run, the first sample's greedy tokens, KV-cache bytes and
    prefill logits."""
    samples = {k: [] for k in TIMES}
    for i in range(cfg.warmup + cfg.repeats):
        _, t_vision = clock(vision)
        prefilled, t_prefill = clock(lambda: runner.prefill(tok))
        logits = prefilled[0]
        _, t_first = clock(lambda: (vision(), runner.prefill(tok)[0].argmax(-1)))
        ids, step, kv_bytes = runner.generate(tok)
        _, t_setup = clock(step)  # the first step also sets decoding up (e.g. captures the CUDA graph)
        _, t_steps = clock(lambda: [step() for _ in range(cfg.new_tokens - 2)])  # noqa: B023 - called right here
        if i >= cfg.warmup:
            values = (t_vision, t_prefill, t_first, t_steps / (cfg.new_tokens - 2), t_setup)
            for key, value in zip(TIMES, values):
                samples[key].append(value)
        progress(i + 1)
    return samples, torch.stack(ids, 1)[0].tolist(), kv_bytes, logits[0].float().cpu()


def copy_bandwidth(device: torch.device) -> float:
    """The device's measured copy bandwidth, bytes read + written per second (a 1 GiB copy on CUDA,
    64 MiB on the CPU; the best of 5): what a decode step that reads its weights is bound by."""
    n = (1 << 30 if device.type == "cuda" else 1 << 26) // 2
    a, b, clock = torch.empty(n, dtype=torch.bfloat16, device=device), None, Clock(device)
    b = torch.empty_like(a)
    best = min(clock(lambda: b.copy_(a))[1] for _ in range(5))
    return 2 * a.numel() * a.element_size() / (best * 1e-3)


def decode_weight_bytes(hf, lm, name: str, budget) -> int:
    """Weight bytes a decode step reads: every decoder layer, the final norm and lm_head, and at a
    VISOR budget the CA modules (the embedding table is only indexed)."""
    modules = [*lm.originals, hf.get_output_embeddings(), lm.norm]
    if not name.startswith("hf") and budget != "full":
        modules += list(lm.cross.values())
    seen = {id(p): p for m in modules for p in m.parameters()}  # shared tensors counted once
    return sum(p.numel() * p.element_size() for p in seen.values())


def serving(cfg: BenchConfig, times: dict, kv_bytes: int, weight_bytes: int, copy_bw: float) -> dict:
    """What a server sees: tokens and requests per second at this batch, KV-cache bytes per request and
    how many requests' caches fit in ``memory_budget_gib``, and decode against the bandwidth bound
    (weights + the whole KV cache read once per step, at the measured copy bandwidth)."""
    per_request = kv_bytes // cfg.batch
    request_ms = times["ttft_ms"] + (cfg.new_tokens - 1) * times["decode_ms"]
    step_bytes = weight_bytes + kv_bytes
    bound_ms = step_bytes / copy_bw * 1e3
    return {
        "prefill_tokens_per_s": round(cfg.batch * (cfg.visual_tokens + cfg.text_tokens) / times["prefill_ms"] * 1e3, 1),
        "decode_tokens_per_s": round(cfg.batch / times["decode_ms"] * 1e3, 1),
        "requests_per_s": round(cfg.batch / request_ms * 1e3, 3),
        "kv_cache_bytes_per_request": per_request,
        "requests_in_memory_budget": int(cfg.memory_budget_gib * 2**30 // per_request) if per_request else None,
        "decode_bytes_per_step": step_bytes,
        "decode_gb_per_s": round(step_bytes / times["decode_ms"] * 1e-6, 3),
        "decode_bound_ms": round(bound_ms, 4),
        "decode_vs_bound": round(times["decode_ms"] / bound_ms, 3),
    }


def _rate(flops: int, ms: float) -> float | None:
    return round(flops / (ms * 1e-3) / 1e12, 4) if ms else None
