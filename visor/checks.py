"""User values, checked where they enter (CLI options and the public API): one rule per kind.

Each function returns the value (normalised) or raises ``ConfigError`` naming the option, the
value and what is allowed. The CLI passes its options straight to the API, which checks them here.
"""

from __future__ import annotations

import math

import torch

from .errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def count(name: str, value, low: int = 0) -> int:
    """An integer >= ``low`` (a number of steps, tokens, samples, workers...)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, not {value!r}")
    return value


def number(name: str, value, low: float | None = None, high: float | None = None, low_open: bool = False) -> float:
    """A finite number in [low, high] (or (low, high] with ``low_open``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low)) and (high is None or value <= high)
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"<= {high}"
        raise ConfigError(f"{name} must be a number {' and '.join(p for p in (lo, hi) if p)}, not {value!r}")
    return float(value)


def int_list(name: str, spec: str) -> list[int]:
    """'6,12,18' -> [6, 12, 18]."""
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{name} must be integers separated by commas, e.g. 6,12,18; not {spec!r}") from None


def device(spec: str | torch.device = "auto") -> torch.device:
    """'auto' (the GPU if there is one, else the CPU), 'cpu', 'cuda' or 'cuda:N'."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no GPU visible"
            raise ConfigError(
                f"device {spec!r}: CUDA is not available here (torch {torch.__version__}, {build}); "
                "use --device cpu or auto"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {spec!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def dtype(spec: str | torch.dtype = "auto", on: torch.device | None = None) -> torch.dtype:
    """'auto' (bfloat16 on a GPU, float32 on the CPU), 'float32', 'bfloat16' or 'float16'."""
    if isinstance(spec, torch.dtype):
        if spec not in DTYPES.values():
            raise ConfigError(f"unsupported dtype {spec}; use one of {', '.join(DTYPES)}")
        return spec
    if spec == "auto":
        return torch.bfloat16 if on is not None and on.type == "cuda" else torch.float32
    if spec not in DTYPES:
        raise ConfigError(f"unknown dtype {spec!r}; choose auto or one of {', '.join(DTYPES)}")
    return DTYPES[spec]


def dtype_name(value: torch.dtype) -> str:
    """The name ``dtype`` takes for a torch dtype: torch.bfloat16 -> "bfloat16"."""
    return str(value).removeprefix("torch.")
