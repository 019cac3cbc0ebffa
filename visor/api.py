"""The Python API: ``visor.load(path)`` -> ``VisorModel`` with ``generate``, ``flops``, ``save``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import checks
from .backbone import Backbone, Sample, read_config
from .checkpoint import base_weights, checkpoint_dtype, load_visor_weights, read_visor_json, write_checkpoint
from .errors import CheckpointError, ConfigError, InputError
from .flops import FlopReport, count_flops, decode_flops
from .generate import GenerationConfig, Runner, collate, generate
from .model import VisorLM
from .outputs import claim
from .policy import Policy
from .reduce import Reduction, visionzip_of
from .schedule import Budget, Schedule


@dataclass
class Generation:
    text: str
    token_ids: list[int]  # the new tokens only
    budget: Budget
    n_visual: int
    n_text: int
    flops: dict  # {"prefill", "lm_prefill", "decode", "total"} for this sample
    prefill_seconds: float  # the language-model prefill of the batch this sample was in

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class VisorModel:
    def __init__(self, backbone: Backbone, schedule: Schedule, is_visor: bool = False):
        self.backbone, self.schedule = backbone, schedule
        self.is_visor = is_visor  # loaded from a VISOR checkpoint (trained CA layers), not a base one
        self.lm = VisorLM(backbone.hf, schedule)
        self.runners: dict[tuple[str, str], Runner] = {}  # (prefill, decode) modes -> Runner, kept across calls

    @property
    def config(self):
        return self.backbone.config

    @property
    def placement(self) -> dict:
        """Where and in what precision the model runs, as results record it."""
        return {"device": str(self.backbone.device), "dtype": checks.dtype_name(self.lm.lm_head.weight.dtype)}

    # ---- inference ----------------------------------------------------------------------
    def encode(
        self, prompts: list[str], images: list[list], reduction: Reduction | None = None, towered=None
    ) -> list[Sample]:
        """Prompts with their images, encoded for ``generate_encoded`` (``towered``: see ``Backbone.encode_batch``)."""
        if reduction is not None:
            reduction.check(self.config)  # before any work: a reduction this family does not define
        return self.backbone.encode_batch(prompts, images, visionzip_of(reduction), towered)

    def generate(
        self,
        images,
        prompts: str | list[str],
        budget: Budget | str | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        reduction: Reduction | None = None,
        prefill: str = "auto",
        decode: str = "auto",
    ) -> Generation | list[Generation]:
        """Answer one prompt (str; images = a path/PIL image or a list of them) or a batch of
        prompts (list; images = one entry per prompt, each an image or a list of images).
        ``budget``: 0..n, "full" (the base model), "auto" (the policy); None: ``default_budget``.
        ``prefill`` / ``decode``: how the prompt and the new tokens run (``visor.generate.Prefill``,
        ``Decoder``); "auto": compiled and replayed as CUDA graphs on a GPU, prompts padded to a few
        lengths so that the graphs serve them all; eager on the CPU. The tokens are the same."""
        single = isinstance(prompts, str)
        prompts_list, images_list = ([prompts], [images]) if single else (prompts, images)
        if not isinstance(prompts_list, (list, tuple)) or not all(isinstance(p, str) for p in prompts_list):
            raise InputError("prompts must be a string or a list of strings")
        if images_list is None or any(ims is None for ims in images_list):
            raise InputError("images is None: pass an image (path or PIL image), a list of them, or [] for none")
        if not isinstance(images_list, (list, tuple)):
            raise InputError(
                f"{len(prompts_list)} prompts need a list of image entries, one per prompt, not {images_list!r}"
            )
        if len(images_list) != len(prompts_list):
            raise InputError(f"{len(prompts_list)} prompt(s) but {len(images_list)} image entries")
        images_list = [ims if isinstance(ims, (list, tuple)) else [ims] for ims in images_list]
        GenerationConfig(max_new_tokens, temperature, top_p, seed)  # bad options are refused before any work
        self.runner(prefill, decode)
        self.parse_budget(budget, reduction)
        samples = self.encode(prompts_list, images_list, reduction)
        results = self.generate_encoded(
            samples, budget, max_new_tokens, temperature, top_p, seed, reduction, prefill, decode
        )
        return results[0] if single else results

    def generate_encoded(
        self,
        samples: list[Sample],
        budget: Budget | str | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        reduction: Reduction | None = None,
        prefill: str = "auto",
        decode: str = "auto",
    ) -> list[Generation]:
        """``generate`` on prompts already encoded (``encode``, with the same ``reduction``): one
        encoding serves several budgets / settings (``visor.evaluate`` keeps them across settings)."""
        cfg = GenerationConfig(max_new_tokens, temperature, top_p, seed)
        runner = self.runner(prefill, decode)
        budget = self.parse_budget(budget, reduction)
        if reduction is not None:
            reduction.check(self.config)
        visionzip = visionzip_of(reduction)
        wrong = [s.visionzip for s in samples if s.visionzip != visionzip]
        if wrong:
            raise ConfigError(
                f"these prompts were encoded {_with_visionzip(wrong[0])}; this reduction needs them encoded "
                f"{_with_visionzip(visionzip)} (model.encode with the same reduction)"
            )
        tokens = collate(samples, self.backbone.image_token_id, self.backbone.device, runner.buckets)
        drops = reduction.drops(self.lm.cfg.n_layers) if reduction else None
        out = generate(runner, tokens, budget, cfg, self.backbone.eos_token_ids, drops)
        results = []
        for sample, ids, asked, chosen in zip(samples, out.tokens, _each(budget, len(samples)), out.budgets):
            n_visual = sample.visual.shape[0]
            n_text = len(sample.ids) - n_visual
            router = self.lm.policy.config if asked == "auto" else None
            report = self.flops(n_visual, n_text, chosen, sample.n_crops, reduction, sample.grids, router)
            decode = decode_flops(self.config, self.schedule, chosen, n_visual, n_text, len(ids), reduction)
            text = self.backbone.tokenizer.decode(ids, skip_special_tokens=True)
            flops = {
                "prefill": report.prefill,
                "lm_prefill": report.lm_prefill,
                "decode": decode,
                "total": report.prefill + decode,
            }
            results.append(Generation(text, ids, chosen, n_visual, n_text, flops, out.prefill_seconds))
        return results

    def runner(self, prefill: str = "auto", decode: str = "auto") -> Runner:
        """The prefill and decode runner of these modes, made once (its compiled code and graphs stay)."""
        if (prefill, decode) not in self.runners:
            self.runners[prefill, decode] = Runner(self.lm, prefill, decode)
        return self.runners[prefill, decode]

    @property
    def default_budget(self) -> Budget | str:
        """What no budget means: on a VISOR checkpoint the policy ("auto") where it has one, else the
        largest budget (every SA candidate active, CA layers too); on a base checkpoint "full"."""
        if not self.is_visor:
            return "full"
        if self.lm.policy is not None and self.schedule.sa_candidates:
            return "auto"
        return len(self.schedule.sa_candidates)

    def parse_budget(self, budget: Budget | str | None, reduction: Reduction | None = None) -> Budget | str:
        """A schedule budget, or "auto" when this checkpoint has a trained policy. None: the default,
        or "full" with a token reduction (FastV, PyramidDrop, VisionZip run on the base model)."""
        if budget is None:
            return "full" if reduction is not None else self.default_budget
        if isinstance(budget, str) and budget.strip().lower() == "auto":
            if not self.schedule.sa_candidates:
                raise ConfigError("budget 'auto' chooses among SA layers, and this schedule has none")
            if self.lm.policy is None:
                raise ConfigError("budget 'auto' needs a trained policy: run `visor train-policy` on this checkpoint")
            return "auto"
        return self.schedule.parse_budget(budget)

    def flops(
        self,
        n_visual: int,
        n_text: int,
        budget: Budget | str = "full",
        n_crops: int | None = None,
        reduction=None,
        grids: list | None = None,
        router: dict | None = None,
    ) -> FlopReport:
        """FLOPs of one sample: n_visual image tokens and n_text text tokens, n_crops tower crops
        (``grids``: the images' patch grids, for a dynamic-resolution tower; ``router``: the policy's
        config where it chose the budget; see ``visor.flops``)."""
        return count_flops(self.config, self.schedule, budget, n_visual, n_text, n_crops, reduction, grids, router)

    # ---- persistence --------------------------------------------------------------------
    def save(
        self, out: str | Path, state_dict: dict | None = None, overwrite: bool = False, adapter: bool = False
    ) -> Path:
        """Write a VISOR checkpoint. ``state_dict``: full tensors gathered from a sharded
        (FSDP) copy of this model, keyed "hf.*" / "lm.*"; default: this model's own tensors.
        ``overwrite``: replace an earlier checkpoint written by visor at ``out`` (never anything else).
        ``adapter``: only what VISOR adds, over the base weights this model was loaded from (they
        must not have changed since: use it when only VISOR's own modules were trained)."""
        meta = {"base_architecture": self.config.model_type, "schedule": self.schedule.to_dict()}
        if self.lm.policy is not None:
            meta["policy"] = self.lm.policy.config
        hf_state, visor_state = None, self.lm.visor_state_dict()
        if state_dict is not None:
            tied = getattr(self.config, "tie_word_embeddings", False)  # lm_head is the embedding matrix
            hf_state = {k[3:]: v for k, v in state_dict.items() if k.startswith("hf.")}
            hf_state = {k: v for k, v in hf_state.items() if not (tied and k == "lm_head.weight")}
            visor_state = {key: state_dict[f"lm.{name}"] for key, name in self.lm.visor_keys().items()}
        base = self.backbone.weights_path if adapter else None
        return write_checkpoint(
            Path(out), self.backbone.path, self.backbone.hf, meta, visor_state, hf_state, overwrite, base
        )


def load(
    path: str | Path,
    schedule: Schedule | str | dict | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    attn_implementation: str = "sdpa",
    base: str | Path | None = None,
) -> VisorModel:
    """Load a VISOR checkpoint (full or adapter), or a base LLaVA / LLaVA-OneVision / Qwen2-VL /
    Qwen2.5-VL / Qwen3-VL / InternVL checkpoint (default schedule). ``device``: auto (the GPU if
    there is one), cpu, cuda, cuda:N; ``dtype``: auto (bfloat16 on a GPU, float32 on the CPU),
    float32, bfloat16, float16. ``base``: where an adapter's base weights are now, if not where its
    visor.json says."""
    path = Path(path)
    device = checks.device(device)
    dtype = checks.dtype(dtype, device)
    config = read_config(path)  # fail fast on unsupported architectures, before loading weights
    n_layers = config.text_config.num_hidden_layers
    meta = read_visor_json(path) if path.is_dir() else None
    if meta is not None and schedule is not None:
        raise ConfigError(f"{path} is a VISOR checkpoint with its own schedule; don't pass another one")
    if meta is not None:
        schedule = Schedule.from_spec(meta["schedule"], n_layers)
    elif not isinstance(schedule, Schedule):
        schedule = Schedule.from_spec(schedule, n_layers)
    schedule.check_depth(n_layers)
    weights = base_weights(path, meta, base)
    if weights is not None and _shape(read_config(weights)) != _shape(config):
        raise CheckpointError(
            f"the base {weights} is not the model {path} was made from: {_shape(read_config(weights))}"
        )
    model = VisorModel(Backbone(path, dtype, device, attn_implementation, weights), schedule, meta is not None)
    if meta is not None and meta.get("policy"):
        p = meta["policy"]
        # a policy saved before the probe existed read the states entering the first SA candidate
        probe = p.get("probe_layers", schedule.sa_candidates[0] if schedule.sa_candidates else 0)
        if not isinstance(probe, int) or isinstance(probe, bool) or not 0 <= probe <= n_layers:
            raise CheckpointError(f"{path}: the policy's probe runs {probe!r} layers; the model has {n_layers}")
        policy = Policy(model.lm.cfg.hidden, p["n_budgets"], p["width"], p["cost_weight"], probe)
        model.lm.policy = policy.to(model.backbone.device)
    if meta is not None:
        load_visor_weights(path, model.lm.visor_state_dict())
    return model


def _shape(config) -> dict:
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")
    return {"model_type": config.model_type} | {k: getattr(config.text_config, k, None) for k in keys}


def convert(
    base: str | Path, out: str | Path, schedule=None, position_encoding: str | None = None, overwrite: bool = False
) -> Path:
    """Make a VISOR checkpoint from a base checkpoint (CA modules initialised, gates at zero).
    From a VISOR checkpoint the result keeps its schedule and CA weights (they belong together).
    The result is an adapter over the weights ``base`` was loaded from (see visor.checkpoint), in
    their dtype: it needs them where they are (``visor export`` makes a self-contained copy).
    ``out`` must be new, empty, or (with ``overwrite``) an earlier checkpoint written by visor."""
    config = read_config(base)
    claim(out, "checkpoint", inputs=[base], overwrite=overwrite, mark=False)  # before minutes of loading
    dtype = checkpoint_dtype(base) or torch.float32  # in the base's own dtype: no float32 copy of a bf16 model
    if read_visor_json(Path(base)) is not None:
        if schedule is not None or position_encoding is not None:
            raise ConfigError(f"{base} is already a VISOR checkpoint; its schedule and position encoding are fixed")
        return load(base, dtype=dtype, device="cpu").save(out, overwrite=overwrite, adapter=True)
    n_layers = config.text_config.num_hidden_layers
    sched = schedule if isinstance(schedule, Schedule) else Schedule.from_spec(schedule, n_layers)
    if position_encoding is not None:
        sched = Schedule(sched.roles, position_encoding)
    return load(base, sched, dtype=dtype, device="cpu").save(out, overwrite=overwrite, adapter=True)


def export(path: str | Path, out: str | Path, overwrite: bool = False, base: str | Path | None = None) -> Path:
    """A self-contained (full) copy of a VISOR checkpoint: an adapter's base weights are written
    into it, in their own dtype; ``base``: where the adapter's base is now, if it moved."""
    path = Path(path)
    weights = base_weights(path, read_visor_json(path), base) or path
    claim(out, "checkpoint", inputs=[path, weights], overwrite=overwrite, mark=False)  # nor over the base
    dtype = checkpoint_dtype(weights) or torch.float32
    return load(path, dtype=dtype, device="cpu", base=base).save(out, overwrite=overwrite)


def _with_visionzip(visionzip) -> str:
    return "without VisionZip" if visionzip is None else f"with VisionZip({visionzip[0]}+{visionzip[1]})"


def _each(budget, n: int) -> list:
    """The budget each of n samples asked for (one for all, or a list)."""
    return list(budget) if isinstance(budget, (list, tuple)) else [budget] * n
