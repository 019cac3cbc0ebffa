"""VISOR checkpoints: a base HF checkpoint + ``visor.json`` + ``visor.safetensors``.

``visor.json`` holds the format version and the schedule; ``visor.safetensors`` the parameters
VISOR adds (cross-attention modules, the optional conv positional code, the policy). Everything
else is the base checkpoint, byte for byte where we did not change it (tokenizer, processor,
template). A directory without ``visor.json`` is a base checkpoint and loads with a default schedule.

Two forms:
- **adapter** (``visor convert``, training stage 1, ``train-policy``): no language-model weights of
  its own; ``visor.json`` names the directory holding them (``"base"``, absolute path);
  ``visor.safetensors`` holds VISOR's tensors as the model had them (``convert`` loads the base in
  its own dtype, so there they are in the base's dtype; training keeps float32).
- **full** (stage 2, ``visor export --merged``, ``VisorModel.save`` by default): the base's
  weights too (``model.safetensors``), in the dtype they had in memory; self-contained.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .outputs import MARKER, write_dir

FORMAT_VERSION = 1
VISOR_JSON, VISOR_WEIGHTS = "visor.json", "visor.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
POLICY_KEYS = ("n_budgets", "width", "cost_weight")


def read_visor_json(path: Path) -> dict | None:
    """The checkpoint's visor.json (checked), or None for a base checkpoint."""
    file = path / VISOR_JSON
    if not file.is_file():
        return None
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{file} must hold a JSON object, not a {type(meta).__name__}")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{file}: format_version must be an integer, not {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{file} has format version {version}; upgrade visor-lvlm to read it")
    if not isinstance(meta.get("schedule"), dict):
        raise CheckpointError(f'{file} has no "schedule" object (the layer roles); is the checkpoint complete?')
    if "base" in meta and not (isinstance(meta["base"], str) and meta["base"]):
        raise CheckpointError(f'{file}: "base" must name the directory of the base weights')
    policy = meta.get("policy")
    if policy is not None and not (
        isinstance(policy, dict) and all(isinstance(policy.get(k), (int, float)) for k in POLICY_KEYS)
    ):
        raise CheckpointError(f'{file}: "policy" must be an object with numbers {", ".join(POLICY_KEYS)}')
    return meta


def base_weights(path: Path, meta: dict | None, override: str | Path | None = None) -> Path | None:
    """Where an adapter's language-model weights live (None: in ``path`` itself)."""
    if override is not None:
        if meta is None or "base" not in meta:
            raise CheckpointError(f"{path} holds its own weights (it is not an adapter): don't pass base=")
        base = Path(override)
    elif meta is not None and "base" in meta:
        base = Path(meta["base"])
        base = base if base.is_absolute() else path / base
    else:
        return None
    if not (base / "config.json").is_file():
        raise CheckpointError(
            f"{path} is an adapter over the base checkpoint {base}, which is not there: "
            "put it back, or say where it is now: visor.load(PATH, base=DIR) or visor.export(PATH, OUT, base=DIR)"
        )
    return base


def checkpoint_dtype(path: Path) -> torch.dtype | None:
    """The dtype a checkpoint's config.json gives its weights (``dtype``, older ``torch_dtype``)."""
    try:
        raw = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = raw.get("dtype") or raw.get("torch_dtype") if isinstance(raw, dict) else None
    return getattr(torch, name, None) if isinstance(name, str) else None


def load_visor_weights(path: Path, expected: dict[str, torch.Tensor]) -> None:
    """Load visor.safetensors into ``expected`` (views of a model's parameters, by checkpoint name:
    ``VisorLM.visor_state_dict``), checking names and shapes."""
    file = path / VISOR_WEIGHTS
    if not expected and not file.exists():
        return
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: the checkpoint's visor.json needs its cross-attention weights")
    try:
        tensors = load_file(file, device=str(next(iter(expected.values())).device) if expected else "cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {file} (truncated or corrupt?): {e}") from None
    missing, extra = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
    wrong = [k for k in expected.keys() & tensors.keys() if tensors[k].shape != expected[k].shape]
    if missing or extra or wrong:
        raise CheckpointError(
            f"{file} does not match visor.json and the model config: "
            f"missing {sorted(missing)[:4]}, unexpected {sorted(extra)[:4]}, wrong shape {sorted(wrong)[:4]}"
        )
    with torch.no_grad():
        for name, tensor in expected.items():  # views of the module's parameters
            tensor.copy_(tensors[name])


def write_checkpoint(
    out: Path,
    source: Path,
    hf_model,
    visor_meta: dict,
    visor_tensors: dict,
    hf_state: dict | None = None,
    overwrite: bool = False,
    base: Path | None = None,
) -> Path:
    """Write a complete VISOR checkpoint beside ``out``, then swap it in (see visor.outputs).
    ``base``: write an adapter over the weights in that directory instead of a full checkpoint."""
    if base is not None:  # the tensors as they are in memory: `convert` loads the base in its own dtype
        visor_meta = visor_meta | {"base": str(Path(base).resolve())}

    def build(tmp: Path) -> None:
        for f in Path(source).iterdir():  # config, tokenizer, processor, chat template, ...
            if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and "index.json" not in f.name:
                if f.name not in (VISOR_JSON, MARKER):
                    shutil.copy2(f, tmp / f.name)
        if base is None:
            hf_model.save_pretrained(tmp, state_dict=hf_state)
        if visor_tensors:
            save_file({k: v.detach().contiguous().cpu() for k, v in visor_tensors.items()}, tmp / VISOR_WEIGHTS)
        (tmp / VISOR_JSON).write_text(json.dumps({"format_version": FORMAT_VERSION, **visor_meta}, indent=2) + "\n")

    return write_dir(out, "checkpoint", build, inputs=[source, base], overwrite=overwrite)
