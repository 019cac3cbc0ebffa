"""Convert a pretrained LVLM into a universal VISOR network: stage 1 (CA only), stage 2 (all).

Every optimisation step samples one budget (the same on every rank) and trains the language-
modelling loss on the answer tokens at that budget, so one set of weights serves every budget.

    visor train --model BASE --data train.json --images DIR --stage 1 --out runs/s1
    torchrun --nproc_per_node 8 -m visor.train --model ... --stage 2 --out runs/s2   # same flags

Plain PyTorch distributed: DDP (or FSDP2 ``fully_shard`` with ``--fsdp``), gloo on CPU, NCCL on
GPU. The data order is a seeded permutation per epoch, cut into global batches; rank r takes
its slice, so N ranks with batch b step exactly like one process with batch N*b. Checkpoints
(weights, optimizer, scheduler, RNG states, step) are written to a temporary directory and
renamed; ``--resume`` continues from the newest one.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn

from . import checks
from .api import VisorModel, load
from .backbone import TOWERED
from .data import Bad, Example, RecordIndex, TrainSet
from .errors import ConfigError, InputError, OutputError
from .generate import collate
from .outputs import atomic_write, claim, drop_aside, remove_stale, set_aside, writing
from .reduce import reduces, visionzip_of, visionzip_serves_plain
from .schedule import Schedule


@dataclass
class TrainConfig:
    model: str = ""
    data: str = ""
    images: str = ""  # directory image paths are relative to; "" = the data file's directory
    out: str = "runs/train"
    stage: int = 2  # 1: train only the CA modules; 2: train everything
    budgets: str = "all"  # "all" = 0..n, or "0-8", "0,2,4", "1-3,full"
    budget_weights: list[float] = field(default_factory=list)  # sampling weights; empty = uniform
    steps: int = 0  # 0 = `epochs` worth of steps
    epochs: float = 1.0
    batch_size: int = 8  # per process and micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0  # cosine decay to lr * min_lr_ratio
    clip: float = 1.0  # max gradient norm; 0 = off
    freeze_vision: bool = False  # stage 2: keep the vision tower fixed
    # train the base model under a token reduction, as its paper does (JSON of visor.reduce.Reduction's
    # fields, e.g. {"method": "pdrop", "stages": [1, 2, 4], "ratio": 0.5}); needs --budgets full
    reduction: str = ""
    projector_only: bool = False  # stage 2: train only the multimodal projector (VisionZip's fine-tuning)
    # keep each record's vision-tower output after the first step that meets it (a fixed tower: stage 1,
    # freeze_vision or projector_only; LLaVA / LLaVA-OneVision); memory grows with the records (TowerCache)
    cache_vision: bool = False
    activation_checkpointing: bool = False
    save_every: int = 0  # steps between checkpoints; 0 = only the final model
    resume: bool = False  # continue the run in `out` from its newest checkpoint
    overwrite: bool = False  # start again in `out`, replacing an earlier run there (kept until the new one ends)
    seed: int = 0
    fsdp: bool = False
    device: str = "auto"  # auto: cuda:LOCAL_RANK if available, else cpu
    dtype: str = (
        "auto"  # compute (and final/) precision: auto = bfloat16 on CUDA, float32 on CPU; master weights float32
    )
    workers: int = 0  # DataLoader processes reading, tokenizing and loading images ahead of the steps
    max_bad: float = 0.05  # stop once more than this fraction of the records met are unusable

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from None
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must hold a mapping of options (key: value), not a {type(data).__name__}")
        types = {f.name: f.type for f in fields(cls)}
        unknown = set(data) - set(types)
        if unknown:
            raise ConfigError(f"unknown keys in {path}: {sorted(unknown)}")
        for key, value in data.items():
            if not _has_type(value, types[key]):
                raise ConfigError(f"{path}: {key} must be {types[key]}, not {value!r}")
        return cls(**data)

    def check(self) -> None:
        if not self.model or not self.data:
            raise ConfigError("--model and --data are required")
        if self.stage not in (1, 2):
            raise ConfigError(f"--stage must be 1 or 2, not {self.stage}")
        for name in ("batch_size", "grad_accum"):
            checks.count(name, getattr(self, name), 1)
        for name in ("steps", "warmup_steps", "save_every", "seed", "workers"):
            checks.count(name, getattr(self, name))
        checks.number("max_bad", self.max_bad, 0, 1)
        if checks.dtype(self.dtype) == torch.float16:
            raise ConfigError("--dtype float16 would need loss scaling; train in bfloat16 or float32")
        checks.number("lr", self.lr, 0, low_open=True)
        checks.number("epochs", self.epochs, 0, low_open=True)
        checks.number("min_lr_ratio", self.min_lr_ratio, 0, 1)
        checks.number("clip", self.clip, 0)
        for w in self.budget_weights:
            checks.number("a budget weight", w, 0)
        if self.budget_weights and sum(self.budget_weights) == 0:
            raise ConfigError("--budget-weights are all zero: no budget could ever be sampled")
        if self.projector_only and self.stage != 2:
            raise ConfigError("--projector-only trains the base model's projector: use --stage 2")
        if self.cache_vision and not (self.stage == 1 or self.freeze_vision or self.projector_only):
            raise ConfigError("--cache-vision keeps the vision tower's outputs: the tower must stay fixed "
                              "(stage 1, --freeze-vision or --projector-only)")  # fmt: skip
        if self.cache_vision and self.fsdp:  # the tower is sharded with the root: it runs only inside the forward
            raise ConfigError("--cache-vision runs the tower outside FSDP's forward: use it without --fsdp")
        if self.reduction:
            self.parsed_reduction()
            if self.stage != 2 or self.budgets.strip().lower() != "full":
                raise ConfigError("--reduction trains the base under a token reduction: use --stage 2 --budgets full")
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in --out, --overwrite starts it again: choose one")

    def parsed_reduction(self):
        """``reduction`` as a visor.reduce.Reduction (None: none)."""
        from .reduce import Reduction

        if not self.reduction:
            return None
        example = '{"method": "pdrop", "stages": [1, 2, 4], "ratio": 0.5}'
        try:
            spec = json.loads(self.reduction)
            if not isinstance(spec, dict):
                raise TypeError(f"not an object: {spec!r}")
            for key, value in spec.items():
                kind = REDUCTION_FIELDS.get(key)
                if kind is None:
                    raise TypeError(f"unknown field {key!r}; fields: {', '.join(REDUCTION_FIELDS)}")
                if not _has_type(value, kind):
                    raise TypeError(f"{key} must be {kind}, not {value!r}")
            return Reduction(**spec)
        except (json.JSONDecodeError, TypeError) as e:
            raise ConfigError(f"--reduction must be a JSON object of reduction fields, e.g. {example}: {e}") from None


REDUCTION_FIELDS = {"method": "str", "layer": "int", "keep": "float", "stages": "list[int]", "ratio": "float",
                    "dominant": "int", "contextual": "int"}  # fmt: skip


def _has_type(value, annotation: str) -> bool:
    """A YAML value against a TrainConfig field's annotation (str, int, float, bool, list[float] / [int])."""
    number = (int, float)
    if annotation == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if annotation in ("list[float]", "list[int]"):
        kind = number if annotation == "list[float]" else int
        return isinstance(value, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)
    return isinstance(value, {"str": str, "int": int, "float": number}[annotation])


def parse_budgets(spec: str, schedule: Schedule) -> list:
    """'all', '0-8', '0,2,4', '1-3,full' -> a list of budgets valid for this schedule."""
    if spec.strip() == "all":
        return schedule.sa_budgets
    budgets = []
    for part in spec.split(","):
        part = part.strip()
        if "-" in part:
            lo, _, hi = part.partition("-")
            if not (lo.isdigit() and hi.isdigit()):
                raise ConfigError(f"bad budget range {part!r}; write e.g. 0-8")
            budgets += [schedule.parse_budget(b) for b in range(int(lo), int(hi) + 1)]
        else:
            budgets.append(schedule.parse_budget(part))
    return list(dict.fromkeys(budgets))


def budget_for_step(step: int, budgets: list, weights: list[float], seed: int):
    """The budget of one optimisation step: a pure function of (seed, step), so every rank and
    every resumed run agrees without communicating."""
    return random.Random(f"{seed}:{step}").choices(budgets, weights=weights or None)[0]


def sample_indices(step: int, micro: int, cfg: TrainConfig, n_records: int, world: int, rank: int) -> list[int]:
    """Record indices of one rank's micro-batch: global position -> (epoch, seeded permutation)."""
    global_batch = cfg.batch_size * world
    start = (step * cfg.grad_accum + micro) * global_batch + rank * cfg.batch_size
    return [
        epoch_order(n_records, cfg.seed, g // n_records)[g % n_records] for g in range(start, start + cfg.batch_size)
    ]


@functools.lru_cache(maxsize=4)
def epoch_order(n_records: int, seed: int, epoch: int) -> list[int]:
    """The seeded permutation of the records for one epoch (computed once, not per sample)."""
    return torch.randperm(n_records, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


class Trainee(nn.Module):
    """The whole trainable network (HF modules + VISOR's own), forward = summed answer loss."""

    def __init__(self, model: VisorModel, reduction=None):
        super().__init__()
        self.hf, self.lm = model.backbone.hf, model.lm
        self.backbone = [model.backbone]  # in a list: not a submodule (its modules are in hf)
        self.reduction = reduction  # a visor.reduce.Reduction the base trains under, or None
        self.flops: dict[tuple, int] = {}  # prefill FLOPs by sample shape (for the log; shapes repeat)

    def forward(self, batch: list[tuple[list[int], list[bool], list]], budget, towered=None):
        """Summed answer loss, and the batch's [visual tokens, text tokens, forward FLOPs (visor.flops)].
        ``towered``: the batch's vision-tower outputs, where kept (``TowerCache``)."""
        backbone, reduction = self.backbone[0], self.reduction
        losses, _, samples = answer_token_losses(backbone, self.lm, batch, budget, reduction, towered)
        work = [0.0, 0.0, 0.0]
        for s in samples:
            n_visual = s.visual.shape[0]
            n_text = len(s.ids) - n_visual
            work = [work[0] + n_visual, work[1] + n_text, work[2] + self.prefill_flops(budget, n_visual, n_text, s)]
        return losses.sum(), work

    def prefill_flops(self, budget, n_visual: int, n_text: int, sample) -> int:
        """One sample's forward FLOPs (visor.flops), counted once per sample shape."""
        from .flops import count_flops

        shape = (budget, n_visual, n_text, sample.n_crops, str(sample.grids))
        if shape not in self.flops:
            config, schedule = self.backbone[0].config, self.lm.schedule
            report = count_flops(
                config, schedule, budget, n_visual, n_text, sample.n_crops, self.reduction, sample.grids
            )
            self.flops[shape] = report.prefill
        return self.flops[shape]


def answer_token_losses(
    backbone, lm, batch: list[tuple[list[int], list[bool], list]], budget, reduction=None, towered=None
):
    """Cross-entropy of every answer token in a batch of (ids, answer mask, images), and the
    index of the sample each belongs to. Gradients flow wherever parameters require them.
    ``reduction``: a visor.reduce.Reduction applied as at inference (VisionZip to the images' tokens,
    FastV / PyramidDrop drops between layers, ranked by the attention of the token before each answer,
    as PyramidDrop's training ranks them: where the prompt ends at inference). ``towered``: the images'
    tower outputs, where kept."""
    visionzip = visionzip_of(reduction)
    images = [images for _, _, images in batch]
    encoded = backbone.image_features_batch(images, visionzip, towered)  # one pass of the tower, if it runs
    samples = [backbone.expand(ids, visual, labels) for (ids, labels, _), visual in zip(batch, encoded)]
    tok = collate(samples, backbone.image_token_id, backbone.device)
    targets = torch.full_like(tok.text_ids, -100)
    queries = []  # per sample: the text token before each answer, which ranks the visual tokens for a drop
    for b, s in enumerate(samples):  # target of text token j: text token j+1, if it is an answer token
        text_labels = [lab for lab, i in zip(s.labels, s.ids) if i != backbone.image_token_id]
        n = len(text_labels)
        learn = torch.tensor(text_labels[1:], device=targets.device)
        targets[b, : n - 1] = torch.where(learn, tok.text_ids[b, 1:n], -100)
        queries.append([j for j in range(n - 1) if text_labels[j + 1] and not text_labels[j]] or [n - 1])
    drops = reduction.drops(lm.cfg.n_layers) if reduction is not None else None
    if drops:  # as at inference, where the prompt ends: not the sample's last token, which saw the answer
        tok.queries, tok.queries_valid = _padded(queries, tok.text_ids.device)
    t = lm.run(tok, [budget] * len(samples), drops=drops).text
    keep = targets != -100
    logits = lm.logits(t[keep])  # (n_targets, V): only where the loss is
    owner = torch.arange(len(samples), device=keep.device)[:, None].expand_as(keep)[keep]
    return F.cross_entropy(logits.float(), targets[keep], reduction="none"), owner, samples


def _padded(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of indices as (B, longest) with a mask of the real ones (padding: each row's first)."""
    width = max(len(r) for r in rows)
    index = torch.tensor([r + r[:1] * (width - len(r)) for r in rows], device=device)
    valid = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows], device=device)
    return index, valid


class TowerCache:
    """Each record's vision-tower output, kept from the first step that meets the record on
    (``--cache-vision``): the tower is fixed, so its output for a record never changes, while the
    projector and everything after it go on training. Memory: crops x tokens x width per record.

    ``shared``: a dict the caller holds across runs in one process (``train(..., kept_towers=)``);
    the outputs are kept there under what they follow from (``tower_key``), so a later run with the
    same tower, feature layer, image processor, data files and images, and vision path, meets them
    kept. Where one output serves both (``visionzip_serves_plain``), plain and VisionZip runs keep theirs
    in one dict: a VisionZip run encodes again a record kept without its scores and keys, and a plain run
    asked to (``scored``) keeps those too, so that a later VisionZip run meets them. ``in``: whether a
    record's output is kept as this run reads it. The tower runs in eval mode here (a fixed tower: no
    dropout mask kept for good)."""

    def __init__(self, backbone, data: list[Path], images: Path, visionzip=None, shared=None, scored=False):
        config = backbone.config
        self.backbone = backbone
        serves = visionzip_serves_plain(config)
        self.scored = reduces(config, visionzip) or (scored and serves)
        key = tower_key(backbone, data, images, "visionzip" if self.scored and not serves else "plain")
        self.kept = {} if shared is None else shared.setdefault(key, {})

    def __contains__(self, source: str) -> bool:
        """Whether the record's output is kept as this run reads it (scored, where it must be)."""
        if source not in self.kept:
            return False
        return not self.scored or self.kept[source] is None or self.kept[source].scores is not None

    def __call__(self, examples: list[Example]) -> list:
        missing = {x.source: x.images for x in examples if x.source not in self}
        if missing:
            tower = self.backbone.hf.model.vision_tower
            mode = tower.training
            tower.eval()
            with torch.no_grad():
                self.kept.update(zip(missing, self.backbone.tower_batch(list(missing.values()), self.scored)))
            tower.train(mode)
        return [self.kept[x.source] for x in examples]

    def megabytes(self) -> float:
        kept = [x for t in self.kept.values() if t is not None for x in (t.tokens, t.scores, t.keys) if x is not None]
        return sum(x.nbytes for x in kept) / 2**20


def tower_key(backbone, data: list[Path], images: Path, path: str) -> str:
    """What a record's tower output follows from: the tower (``Backbone.tower_digest``), the vision path
    that reads it ("plain", or "visionzip" where VisionZip's tokens are not the plain path's), the data
    files (path, size and time of the last change of each) and the images directory."""
    files = [(os.path.abspath(f), f.stat().st_size, f.stat().st_mtime_ns) for f in data]
    return backbone.tower_digest(path, files, os.path.abspath(images))


def set_trainable(model: VisorModel, cfg: TrainConfig) -> list[tuple[str, nn.Parameter]]:
    for p in model.backbone.hf.parameters():
        p.requires_grad_(cfg.stage == 2)
    if cfg.freeze_vision:
        for p in model.backbone.hf.model.vision_tower.parameters():
            p.requires_grad_(False)
    if cfg.projector_only:
        model.backbone.hf.requires_grad_(False)
        model.backbone.hf.model.multi_modal_projector.requires_grad_(True)
    for prefix, module in model.lm.visor_modules().items():
        module.requires_grad_(prefix != "policy" and not cfg.projector_only)  # the policy: `visor train-policy`
    return [(n, p) for n, p in Trainee(model).named_parameters() if p.requires_grad]  # for the log


def lr_lambda(cfg: TrainConfig, total_steps: int):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


# ---- checkpoints ------------------------------------------------------------------------------


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.copy()), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy(), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"].cpu())  # loaded onto the training device with the rest


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("step-*"))  # only complete ones: they appear by rename
    return found[-1] if found else None


def final_state(trainee: nn.Module, optimizer, fsdp: bool, dtype: torch.dtype, rank: int) -> dict | None:
    """What final/ holds, in the training precision, on rank 0 (on the host: no second copy of the model
    on a GPU); None = the model's own (float32) tensors. Under FSDP every rank must call it (it gathers)."""
    state, _ = full_states(trainee, optimizer, fsdp)
    if dtype == torch.float32 or rank != 0:
        return state
    if state is None:
        state = getattr(trainee, "module", trainee).state_dict()  # under DDP: the wrapped Trainee's
    return {k: v.to("cpu", dtype) if v.is_floating_point() else v for k, v in state.items()}


def full_states(trainee: nn.Module, optimizer, fsdp: bool) -> tuple[dict | None, dict]:
    """Model and optimizer state to save. With FSDP every rank must call this (it gathers)."""
    if not fsdp:
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(trainee, options=opts), get_optimizer_state_dict(trainee, optimizer, options=opts)


def load_optimizer_state(trainee: nn.Module, optimizer, state: dict, fsdp: bool) -> None:
    if state.get("fsdp", False) != fsdp:
        raise ConfigError("resume with the same --fsdp setting the checkpoint was written with")
    if not fsdp:
        optimizer.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # strict=False: parameters that never received a gradient (e.g. an unused vision post-norm) have no state
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False, strict=False)
    set_optimizer_state_dict(trainee, optimizer, optim_state_dict=state["optimizer"], options=options)


def sharded_states(trainee: nn.Module, optimizer) -> dict:
    """Each rank's shards of the model and optimizer state (DTensors under FSDP; whole tensors
    otherwise), by parameter name: what ``torch.distributed.checkpoint`` writes and reshards."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(trainee), "optimizer": get_optimizer_state_dict(trainee, optimizer)}


def load_sharded(checkpoint: Path, trainee: nn.Module, optimizer) -> None:
    """Read an FSDP run's sharded checkpoint into this run's model and optimizer, resharded to this
    run's processes (any number, FSDP or not)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    states = sharded_states(trainee, optimizer)  # the optimizer's: every parameter's state, made up
    saved = set(dcp.FileSystemReader(str(checkpoint / "shards")).read_metadata().state_dict_metadata)
    states["optimizer"]["state"] = {  # only what the run had: a parameter no gradient reached has none
        name: entry
        for name, entry in states["optimizer"]["state"].items()
        if all(f"optimizer.state.{name}.{key}" in saved for key in entry)
    }
    dcp.load(states, checkpoint_id=str(checkpoint / "shards"), no_dist=not dist.is_initialized())
    set_model_state_dict(trainee, states["model"])
    set_optimizer_state_dict(trainee, optimizer, states["optimizer"], options=StateDictOptions(strict=False))


def save_sharded_checkpoint(out: Path, step: int, trainee, optimizer, scheduler, rank: int) -> None:
    """An FSDP run's checkpoints/step-N/{shards/, state.pt}: every rank writes its own shards
    (``torch.distributed.checkpoint``; nothing is gathered), under a temporary name rank 0 renames
    once all are written."""
    import torch.distributed.checkpoint as dcp

    final = out / "checkpoints" / f"step-{step:07d}"
    name = [f".{final.name}.visor-tmp-{os.getpid()}"]  # rank 0's, so that a kill leaves it removable
    dist.broadcast_object_list(name, src=0)
    tmp = final.with_name(name[0])
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    failed = None
    try:
        with writing(final):
            dcp.save(sharded_states(trainee, optimizer), checkpoint_id=str(tmp / "shards"))
            if rank == 0:
                state = {"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state(), "sharded": True}
                atomic_write(tmp / "state.pt", lambda path: torch.save(state, path))  # fsynced
    except OutputError as e:
        failed = e
    ok = torch.tensor([failed is None], dtype=torch.int32, device=next(trainee.parameters()).device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # every rank learns whether every rank wrote its shards
    if rank == 0 and ok.item():
        tmp.rename(final)
    elif rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    if not ok.item():
        raise failed or OutputError(f"another process could not write its part of {final}")


def save_checkpoint(
    out: Path, step: int, model: VisorModel, trainee, optimizer, scheduler, fsdp: bool, rank: int, adapter: bool
):
    """checkpoints/step-N/{model/, state.pt}, written under a temporary name, then renamed (FSDP:
    ``save_sharded_checkpoint``). ``adapter``: the model as an adapter over its base (stage 1)."""
    if fsdp:
        save_sharded_checkpoint(out, step, trainee, optimizer, scheduler, rank)
        return
    model_state, optim_state = full_states(trainee, optimizer, fsdp)
    if rank == 0:
        final = out / "checkpoints" / f"step-{step:07d}"
        tmp = final.with_name(f".{final.name}.visor-tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with writing(final):
                tmp.mkdir(parents=True)
                model.save(tmp / "model", model_state, adapter=adapter)
                state = {
                    "step": step,
                    "optimizer": optim_state,
                    "scheduler": scheduler.state_dict(),
                    "rng": rng_state(),
                    "fsdp": fsdp,
                }
                torch.save(state, tmp / "state.pt")
                tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


# ---- the loop ---------------------------------------------------------------------------------


def setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = checks.device(cfg.device)
    if device.type == "cuda" and device.index is None:  # "auto" or "cuda": this process's GPU
        device = torch.device(f"cuda:{local}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, rank, device


def train(cfg: TrainConfig, kept_towers: dict | None = None, keep_visionzip_scores: bool = False) -> Path:
    """Run (or resume) one training stage; return the path of the final VISOR checkpoint.
    ``kept_towers``: with ``cache_vision``, where tower outputs are kept across runs (``TowerCache``);
    ``keep_visionzip_scores``: a run without VisionZip keeps its scores and keys there too, for a later
    VisionZip run (where one output serves both: ``visor.reduce.visionzip_serves_plain``)."""
    cfg.check()
    world, rank, device = setup_distributed(cfg)
    out = claim_run(cfg, world)
    log = _Log(out, rank)
    if cfg.resume and (out / "final").is_dir():
        log.line(f"--resume: the run in {out} is complete; its model is {out / 'final'}")
        return out / "final"
    resume_from = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and resume_from is None:
        log.line("--resume: no checkpoint yet, starting from the beginning")
    torch.manual_seed(cfg.seed)
    sharded = resume_from is not None and (resume_from / "shards").is_dir()  # read in after wrapping
    start_from = resume_from / "model" if resume_from and not sharded else cfg.model
    compute = checks.dtype(cfg.dtype, device)
    # the starting checkpoint is read in the training dtype (a bfloat16 base never passes through
    # float32); a checkpoint of this run in float32, as its master weights were saved, on the host:
    # only the weights it trains go to the device in float32
    own = start_from != cfg.model
    model = load(start_from, dtype=torch.float32 if own else compute, device="cpu" if own else str(device))
    model.lm.gradient_checkpointing = cfg.activation_checkpointing
    budgets = parse_budgets(cfg.budgets, model.schedule)
    if cfg.budget_weights and len(cfg.budget_weights) != len(budgets):
        raise ConfigError(f"{len(cfg.budget_weights)} budget weights for {len(budgets)} budgets {budgets}")
    reduction = cfg.parsed_reduction()
    if reduction is not None:
        reduction.check(model.config)
        reduction.drops(model.lm.cfg.n_layers)  # prune points that fit the model, before anything is written
    if cfg.projector_only and getattr(model.backbone.hf.model, "multi_modal_projector", None) is None:
        raise ConfigError(f"--projector-only: {model.config.model_type} has no multi_modal_projector")
    if cfg.cache_vision and model.config.model_type not in TOWERED:
        raise ConfigError(f"--cache-vision: {model.config.model_type}'s tower output cannot be kept apart from "
                          f"its projector here; it works for {', '.join(TOWERED)}")  # fmt: skip

    data = TrainSet(RecordIndex(cfg.data), images_dir(cfg), model.backbone)
    usable, bad = data.probe()
    if not usable:
        raise InputError(f"no usable record among the first {len(bad)} of {cfg.data} (first: {bad[:1]})")
    stand_in = data.first_usable()  # run, with weight 0, where a micro-batch holds no usable record
    per_step = cfg.batch_size * world * cfg.grad_accum
    total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * len(data) / per_step))
    start_run(out, cfg, rank)  # every check passed: only now is anything in `out` written or moved
    log.open()
    log.line(f"data: {len(data)} records; of the first {usable + len(bad)}, {len(bad)} unusable (skipped when met)")
    if rank == 0:
        atomic_write(out / "config.yaml", yaml.safe_dump(asdict(cfg) | {"total_steps": total_steps, "world": world}))

    named = set_trainable(model, cfg)
    trainee = Trainee(model, reduction)
    for p in trainee.parameters():  # trained weights (and AdamW's state) in float32, frozen ones in the training dtype
        p.data = p.data.to(device, torch.float32 if p.requires_grad else compute)
    trainee.to(device)  # the buffers too (RoPE tables), where the model was read on the host
    log.line(f"stage {cfg.stage}: training {sum(p.numel() for _, p in named):,} parameters in {len(named)} tensors")
    fsdp = cfg.fsdp and world > 1
    if fsdp:
        _shard(trainee, compute)
    elif world > 1:
        trainee = nn.parallel.DistributedDataParallel(
            trainee, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=True
        )
    params = [p for p in trainee.parameters() if p.requires_grad]  # after wrapping: FSDP swaps parameters
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    start = 0
    if resume_from is not None:
        state = torch.load(resume_from / "state.pt", weights_only=True, map_location=device)
        if sharded:
            load_sharded(resume_from, trainee, optimizer)
        else:
            load_optimizer_state(trainee, optimizer, state, fsdp)
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start = state["step"]
        log.line(f"resumed from {resume_from} at step {start}")
    if cfg.resume:
        log.truncate_metrics(start)  # what the interrupted run logged past its checkpoint

    trainee.train()
    cache = None
    if cfg.cache_vision:
        files, images = data.index.files, images_dir(cfg)
        cache = TowerCache(model.backbone, files, images, visionzip_of(reduction), kept_towers, keep_visionzip_scores)
        data.kept_towers = cache  # records kept as this run reads them: images not read (--workers: as at the fork)
    bar = log.progress(total_steps, start)
    began, samples_done, tokens_done, totals = time.perf_counter(), 0, 0, [0.0, 0.0, 0.0]
    peak = peak_flops(device)
    batches = iter(loader(data, cfg, start, total_steps, world, rank))
    seen = torch.zeros(2, dtype=torch.long)  # records met, unusable ones among them (all ranks)
    for step in range(start, total_steps):
        budget = budget_for_step(step, budgets, cfg.budget_weights, cfg.seed)
        micro = [next(batches) for _ in range(cfg.grad_accum)]  # this rank's micro-batches of Example/Bad
        for item in (x for items in micro for x in items if isinstance(x, Bad)):
            log.line(f"skipped {item.source}: {item.reason}", echo=False)
        local = [sum(sum(x.labels[1:]) for items in micro for x in items if isinstance(x, Example))]
        local += [sum(len(items) for items in micro), sum(isinstance(x, Bad) for items in micro for x in items)]
        counts = torch.tensor(local, device=device)
        if world > 1:
            dist.all_reduce(counts)  # the step's answer tokens, records met and bad ones, over all ranks
        n_targets, seen = int(counts[0]), seen + counts[1:].cpu()
        check_bad(seen, cfg, min(len(data), total_steps * per_step), log)
        usable_step = int(counts[1]) > int(counts[2])  # some rank has a usable record
        loss_sum = torch.zeros((), device=device)
        work = torch.zeros(3, dtype=torch.float64, device=device)  # visual tokens, text tokens, forward FLOPs
        for m, items in enumerate(micro):
            examples = [x for x in items if isinstance(x, Example)]
            weight = 1.0 if examples else 0.0  # every rank runs every micro-batch: FSDP/DDP collectives pair up
            examples = examples or [stand_in]
            batch = [(x.ids, x.labels, x.images) for x in examples]
            sync = m == len(micro) - 1 or not isinstance(trainee, nn.parallel.DistributedDataParallel)
            with (
                _maybe_no_sync(trainee, sync),  # FSDP casts by its policy; the rest by autocast
                torch.autocast(device.type, compute, enabled=compute != torch.float32 and not fsdp),
            ):
                loss, counted = trainee(batch, budget, cache(examples) if cache else None)
                if loss.requires_grad:  # False when nothing trainable runs (stage 1 at budget "full")
                    (loss * (weight * world / max(1, n_targets))).backward()
            loss_sum += weight * loss.detach()
            work += weight * torch.tensor(counted, dtype=torch.float64, device=device)
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        if usable_step:  # a step of unusable records only moves nothing (AdamW's momentum would)
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:  # one collective: the loss with the work counts
            summed = torch.cat([loss_sum.double()[None], work])
            dist.all_reduce(summed)
            loss_sum, work = summed[0], summed[1:]
        step_loss = loss_sum.item() / max(1, n_targets)
        totals = [t + w for t, w in zip(totals, work.tolist())]
        samples_done += per_step
        tokens_done += n_targets
        elapsed = time.perf_counter() - began
        log.metric(
            {
                "step": step + 1,
                "budget": budget,
                "loss": step_loss,
                "lr": scheduler.get_last_lr()[0],
                "samples_per_s": samples_done / elapsed,
                "target_tokens_per_s": tokens_done / elapsed,
                "visual_tokens_per_s": totals[0] / elapsed,
                "text_tokens_per_s": totals[1] / elapsed,
                "model_tflops_per_s": 3 * totals[2] / elapsed / 1e12,  # forward + backward ~ 3 forwards
                **({"mfu": 3 * totals[2] / elapsed / (peak * world)} if peak else {}),
                "elapsed_s": elapsed,
            }
        )
        bar.set_postfix(loss=f"{step_loss:.4f}", budget=budget, tok_s=f"{tokens_done / elapsed:.0f}")
        bar.update(1)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total_steps:
            save_checkpoint(out, step + 1, model, trainee, optimizer, scheduler, fsdp, rank, cfg.stage == 1)
    bar.close()
    if cache:
        log.line(f"kept the vision tower's output of {len(cache.kept)} records ({cache.megabytes():.0f} MB)")
    final = out / "final"
    model_state = final_state(trainee, optimizer, fsdp, compute, rank)
    if rank == 0:
        model.save(final, model_state, overwrite=True, adapter=cfg.stage == 1)  # stage 1: the base is unchanged
        drop_aside(out)  # the run --overwrite replaced, kept until now
    log.summary(budgets)
    if world > 1:
        dist.barrier()
    return final


RUN_ENTRIES = ("checkpoints", "final", "metrics.jsonl", "train.log", "config.yaml")
RESUMABLE = {"resume", "overwrite", "device", "out", "workers", "max_bad"}  # a resumed run may change these
PROCESS_SHAPE = {"batch_size", "grad_accum", "fsdp"}  # ... and these, with the processes, at the same global batch


def claim_run(cfg: TrainConfig, world: int) -> Path:
    """The run directory, checked (read only, on every rank): new or empty, or an earlier run of
    ours to continue (``--resume``: with the same settings; on another number of processes where
    each step still sees the same global batch) or to start again (``--overwrite``)."""
    out = Path(cfg.out)
    claim(out, "train", RUN_ENTRIES, _inputs(cfg), cfg.overwrite, cfg.resume, mark=False)
    if cfg.resume and (out / "config.yaml").is_file():
        try:
            before = yaml.safe_load((out / "config.yaml").read_text())
        except yaml.YAMLError:
            before = None
        if isinstance(before, dict):
            now = _comparable(asdict(cfg))
            before = _comparable(before)
            changed = [k for k, v in now.items() if k not in RESUMABLE and k in before and before[k] != v]
            if set(changed) <= PROCESS_SHAPE and "world" in before:
                was = before["batch_size"] * before["grad_accum"] * before["world"]
                if cfg.batch_size * cfg.grad_accum * world != was:
                    raise ConfigError(
                        f"--resume with {world} process(es) needs the run's global batch of {was} "
                        f"(batch size x grad accum x processes), not {cfg.batch_size * cfg.grad_accum * world}"
                    )
                if "fsdp" in changed and not _sharded_checkpoints(out):
                    raise ConfigError("resume with the same --fsdp setting the checkpoint was written with")
                changed = []
            if changed:
                shown = ", ".join(f"{k}: {before[k]!r} -> {now[k]!r}" for k in changed[:4])
                raise ConfigError(
                    f"--resume needs the settings of the run in {out}; changed: {shown}. "
                    "Start a new run with --overwrite or another --out"
                )
    return out


def _sharded_checkpoints(out: Path) -> bool:
    newest = latest_checkpoint(out)
    return newest is not None and (newest / "shards").is_dir()


def _inputs(cfg: TrainConfig) -> list[str]:
    """What a run reads: its --out may not be or contain them."""
    return [cfg.model, cfg.data, cfg.images]


def _comparable(settings: dict) -> dict:
    """Settings with paths made absolute, so `runs/s1` and `./runs/s1` are the same run."""
    paths = ("model", "data", "images")
    return {k: os.path.abspath(v) if k in paths and isinstance(v, str) and v else v for k, v in settings.items()}


def start_run(out: Path, cfg: TrainConfig, rank: int) -> None:
    """Rank 0 marks `out` ours and sets an earlier run aside (``--overwrite``; deleted when this
    run's final model is written) or tidies what a kill left (``--resume``)."""
    if rank == 0:
        claim(out, "train", RUN_ENTRIES, _inputs(cfg), cfg.overwrite, cfg.resume)
        if cfg.overwrite:
            set_aside(out, "train", RUN_ENTRIES)
        elif (out / "checkpoints").is_dir():
            remove_stale(out / "checkpoints")  # a checkpoint a kill left unfinished
    if dist.is_initialized():
        dist.barrier()


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def peak_flops(device: torch.device) -> float | None:
    """The dense bfloat16 peak of the GPU, for the model FLOPs utilisation (None: unknown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def images_dir(cfg: TrainConfig) -> Path:
    """Where image paths are relative to: --images, else the data file's directory (or the shards')."""
    data = Path(cfg.data)
    return Path(cfg.images) if cfg.images else (data if data.is_dir() else data.parent)


class StepBatches(torch.utils.data.Sampler):
    """One rank's micro-batches (record indices) for steps ``start``..``total``, in order: what the
    DataLoader reads ahead. A pure function of the step, so a resumed run reads what it would have."""

    def __init__(self, start: int, total: int, cfg: TrainConfig, n_records: int, world: int, rank: int):
        self.start, self.total, self.cfg, self.n, self.world, self.rank = start, total, cfg, n_records, world, rank

    def __iter__(self):
        for step in range(self.start, self.total):
            for m in range(self.cfg.grad_accum):
                yield sample_indices(step, m, self.cfg, self.n, self.world, self.rank)

    def __len__(self) -> int:
        return (self.total - self.start) * self.cfg.grad_accum


def loader(data: TrainSet, cfg: TrainConfig, start: int, total: int, world: int, rank: int):
    """Micro-batches (lists of ``Example``/``Bad``) read by ``cfg.workers`` processes (0: in this one)."""
    sampler = StepBatches(start, total, cfg, len(data), world, rank)
    ahead = {"prefetch_factor": 2, "multiprocessing_context": "fork"} if cfg.workers else {}
    return torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=cfg.workers, collate_fn=list, **ahead)


def check_bad(seen: torch.Tensor, cfg: TrainConfig, horizon: int, log: _Log) -> None:
    """Stop when more than --max-bad of the records met (``seen``: met, unusable) are unusable, judged
    once 100 were met, or all the run will meet (``horizon``)."""
    met, bad = int(seen[0]), int(seen[1])
    if bad and met >= min(100, horizon) and bad > cfg.max_bad * met:
        raise InputError(
            f"{bad} of the {met} records met so far are unusable, over --max-bad {cfg.max_bad:g}; "
            f"see {log.out / 'train.log'} for each one"
        )


def _maybe_no_sync(module, sync: bool):
    from contextlib import nullcontext

    return nullcontext() if sync else module.no_sync()


def _shard(trainee: Trainee, compute: torch.dtype) -> None:
    """FSDP2: one unit per decoder layer (its projections, which both our layer and HF's layer
    reference) and per CA module; everything else (embeddings, norms, vision) at the root. The
    float32 shards are gathered and computed in ``compute`` (bfloat16: half the traffic), gradients
    reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    for layer in trainee.lm.originals:
        projections = [layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj, layer.gate_proj, layer.up_proj]
        fully_shard([*projections, layer.down_proj], mp_policy=policy)
    for ca in trainee.lm.cross.values():
        fully_shard(ca, mp_policy=policy)
        register_fsdp_forward_method(ca, "visual_kv")
    fully_shard(trainee, mp_policy=policy)


class _Log:
    """train.log (messages), metrics.jsonl (one line per step), a progress bar; rank 0 only."""

    def __init__(self, out: Path, rank: int):
        self.out, self.rank = out, rank
        self.by_budget: dict = {}
        self.pending: list[str] | None = []  # lines said before the run may write (see open)

    def open(self) -> None:
        """From now on lines go to train.log (with those said before)."""
        lines, self.pending = self.pending, None
        for text in lines:
            self.line(text, echo=False)

    def line(self, text: str, echo: bool = True) -> None:
        if self.rank != 0:
            return
        if self.pending is not None:
            self.pending.append(text)
        else:
            with open(self.out / "train.log", "a") as f:
                f.write(text + "\n")
        if echo:
            print(text, file=sys.stderr)

    def warn(self, text: str) -> None:
        self.line(f"warning: {text}")

    def metric(self, row: dict) -> None:
        self.by_budget.setdefault(row["budget"], []).append(row["loss"])
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """After a resume: drop what the interrupted run logged past its checkpoint (and a line a
        kill cut short)."""
        path = self.out / "metrics.jsonl"
        if self.rank == 0 and path.exists():
            rows = [r for r in path.read_text().splitlines() if (s := _step_of(r)) is not None and s <= step]
            atomic_write(path, "".join(r + "\n" for r in rows))

    def progress(self, total: int, initial: int):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc="train", disable=self.rank != 0, file=sys.stderr)

    def summary(self, budgets: list) -> None:
        parts = [f"{b}: {np.mean(self.by_budget[b]):.4f}" for b in budgets if b in self.by_budget]
        self.line("mean loss per budget (this run): " + ", ".join(parts))


def _step_of(line: str) -> int | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row.get("step") if isinstance(row, dict) else None


def main() -> None:
    """`python -m visor.train` / `torchrun -m visor.train`: the flags of `visor train`."""
    from .cli import main as cli_main

    sys.argv = [sys.argv[0], "train", *sys.argv[1:]]
    cli_main()


if __name__ == "__main__":
    main()
