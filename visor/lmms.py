"""VISOR as an lmms-eval model: ``lmms-eval --model visor --model_args pretrained=DIR,budget=2 --tasks ...``.

Installing visor-lvlm next to lmms-eval registers the model (entry point group ``lmms_eval.models``,
``manifest`` below); lmms-eval itself is imported only when lmms-eval asks, by ``visor.lmms_model``.
This module holds what does the work and needs no lmms-eval: ``Runner`` answers requests (chat
messages with their images, and lmms-eval's generation settings) in batches, and keeps per-sample FLOPs.

model_args (``key=value`` separated by commas): ``pretrained`` (a base or VISOR checkpoint
directory), ``budget`` (0..n, full, auto; default as ``visor generate``), ``method`` (visor, base,
fastv, pdrop, visionzip) with the baselines' knobs ``layer``, ``keep``, ``stages`` (``6-12-18``: lmms-eval
splits model_args at commas), ``ratio``, ``dominant``, ``contextual``; ``dtype``, ``schedule``,
``prefill``/``decode`` (the modes of ``visor generate``), ``flops_file`` (default
``visor_flops_<setting>.json`` in the current directory, e.g.
``visor_flops_visor-2.json``; only a FLOPs file of visor's is ever replaced). ``device`` and
``batch_size`` are lmms-eval's own flags.
"""

from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, OutputError

FLOPS_KIND = "visor lmms-eval FLOPs"  # a flops file we wrote carries this "kind"


def manifest():
    """The ``lmms_eval.models`` entry point: lmms-eval's ModelManifest for ``--model visor``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="visor", chat_class_path="visor.lmms_model.Visor")


@dataclass
class Request:
    """One thing to answer: chat messages as lmms-eval builds them, its generation settings."""

    # [{"role", "content": [{"type": "text", "text"} | {"type": "image", "url": PIL image}]}], or a function
    # giving them when asked (lmms-eval's documents: their images are decoded one batch at a time)
    messages: list | Callable[[], list]
    gen_kwargs: dict = field(default_factory=dict)
    task: str = ""
    doc_id: int = 0


@dataclass
class Answer:
    text: str
    n_input: int  # prompt tokens, visual included
    n_output: int


class Runner:
    """Loads the model once and answers lmms-eval's requests, batch by batch."""

    def __init__(
        self,
        pretrained: str,
        budget: str | int | None = None,
        method: str = "visor",
        layer: int = 2,
        keep: float = 0.5,
        stages: str = "",
        ratio: float = 0.5,
        dominant: int = 54,
        contextual: int = 10,
        dtype: str = "auto",
        device: str | None = None,
        schedule: str | None = None,
        batch_size: int | str = 1,
        flops_file: str | None = None,
        prefill: str = "auto",
        decode: str = "auto",
    ):
        from . import checks
        from .api import load
        from .evaluate import make_setting
        from .generate import modes

        setting = make_setting(method, budget, layer, keep, str(stages).replace("-", ","), ratio, dominant, contextual)
        if not str(batch_size).isdigit():
            raise ConfigError(f"--batch_size must be a whole number for visor, not {batch_size!r}")
        self.batch_size = checks.count("batch_size", int(batch_size), 1)
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if device in (None, "cuda", "auto") and world > 1:  # lmms-eval's processes: one GPU each
            device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        modes(device or "auto", prefill, decode)  # before loading
        self.model = load(pretrained, schedule=schedule or None, dtype=dtype, device=device or "auto")
        self.modes = {"prefill": prefill, "decode": decode}
        self.setting = setting.for_model(self.model)
        label = "".join(c for c in self.setting.label.replace(":", "-") if c.isalnum() or c in "+-_.=")
        suffix = f".rank{rank}" if world > 1 else ""  # each process writes its share
        self.flops_file = Path(flops_file or f"visor_flops_{label}.json")
        self.flops_file = self.flops_file.with_name(self.flops_file.stem + suffix + self.flops_file.suffix)
        _check_flops_file(self.flops_file)
        self.rows: list[dict] = []  # one per answered request, for the FLOPs file

    def generate(self, requests: list[Request]) -> list[Answer]:
        """Answers in the order of ``requests``; requests with equal settings run as one batch."""
        answers: list[Answer | None] = [None] * len(requests)
        groups = defaultdict(list)
        for i, r in enumerate(requests):
            groups[json.dumps(_settings(r.gen_kwargs), sort_keys=True)].append(i)
        for key, indices in groups.items():
            settings = json.loads(key)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                asked = [requests[i].messages for i in chunk]
                prompts, images = zip(*(split_messages(m() if callable(m) else m) for m in asked))
                outs = self.model.generate(
                    list(images),
                    list(prompts),
                    budget=self.setting.budget,
                    max_new_tokens=settings["max_new_tokens"],
                    temperature=settings["temperature"],
                    top_p=settings["top_p"],
                    reduction=self.setting.reduction,
                    **self.modes,
                )
                for i, g in zip(chunk, outs):
                    answers[i] = Answer(cut(g.text, settings["until"]), g.n_visual + g.n_text, len(g.token_ids))
                    self.rows.append(
                        {"task": requests[i].task, "doc_id": requests[i].doc_id, "budget": g.budget}
                        | {k: g.flops[k] for k in ("prefill", "lm_prefill", "total")}
                    )
        self.write_flops()
        return answers

    def write_flops(self) -> Path:
        """The FLOPs file: per task the mean prefill / LM prefill / total FLOPs, and every sample's."""
        from .outputs import atomic_write

        by_task = defaultdict(list)
        for row in self.rows:
            by_task[row["task"]].append(row)
        summary = {
            task: {"n": len(rows)}
            | {f"mean_{k}": statistics.fmean(r[k] for r in rows) for k in ("prefill", "lm_prefill", "total")}
            for task, rows in by_task.items()
        }
        report = {
            "kind": FLOPS_KIND,
            "setting": self.setting.label,
            "method": self.setting.method,
            "budget": self.setting.budget,
            **self.model.placement,
            "tasks": summary,
            "samples": self.rows,
        }
        return atomic_write(self.flops_file, json.dumps(report, indent=1, default=str) + "\n")


def _check_flops_file(path: Path) -> None:
    """Replace only a FLOPs file of ours (or write a new one), in a directory that is there: found out
    before the evaluation, not after it."""
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise OutputError(f"flops_file {path}: {path.parent} is not a directory visor can write to")
    if not path.exists():
        return
    try:
        ours = json.loads(path.read_text()).get("kind") == FLOPS_KIND
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise OutputError(f"flops_file {path} exists and visor did not write it; choose another flops_file=")


def _settings(gen_kwargs: dict) -> dict:
    """lmms-eval's generation settings, with lmms-eval's defaults where a task gives none."""
    until = gen_kwargs.get("until") or []
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    if not gen_kwargs.get("do_sample", temperature > 0):
        temperature = 0.0
    return {
        "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or 1024),
        "temperature": temperature,
        "top_p": float(gen_kwargs.get("top_p") or 1.0),
        "until": [until] if isinstance(until, str) else list(until),
    }


def split_messages(messages) -> tuple[str, list]:
    """The prompt (a system turn's text, then the user turns', in order) and the images (in order) of
    a chat. An assistant turn (a few-shot example) can't be put into one user turn: refused."""
    texts, images = [], []
    for message in messages:
        message = message if isinstance(message, dict) else message.model_dump()
        if message.get("role") not in (None, "user", "system"):
            raise ConfigError(f"visor answers one user turn; this task's chat has a {message.get('role')!r} turn")
        content = message.get("content", [])
        for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            if part.get("type") == "text" and part.get("text", "").strip():
                texts.append(part["text"].strip())
            elif part.get("type") == "image":
                images.append(part.get("url"))
            elif part.get("type") in ("video", "audio"):
                raise ConfigError(f"visor answers about images; this task gives a {part['type']}")
    return "\n".join(texts), images


def cut(text: str, until: list[str]) -> str:
    """The answer up to the first stop string."""
    for stop in until:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text


# ---- the built-in benchmark as lmms-eval tasks ------------------------------------------------------

TASK_UTILS = '''"""Written by `visor data lmms-tasks`: lmms-eval reads the built-in benchmark through these."""

from pathlib import Path

from PIL import Image

from visor.evaluate import anls
from visor.policy import normalise


def doc_to_visual(doc):
    return [Image.open(Path(__file__).parent / doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    prediction = results[0] if results else ""
    references = doc.get("answers") or [doc["answer"]]
    return {
        "exact_match": float(any(normalise(prediction) == normalise(r) for r in references)),
        "anls": anls(prediction, references),
    }
'''

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: generate_until
doc_to_visual: !function visor_task_utils.doc_to_visual
doc_to_text: !function visor_task_utils.doc_to_text
doc_to_target: answer
process_results: !function visor_task_utils.process_results
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
  - metric: anls
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_tasks(
    data: str | Path, out: str | Path, split: str = "test", max_new_tokens: int = 16, overwrite=False
) -> list[str]:
    """lmms-eval tasks over a split of the built-in benchmark (``visor data make``): ``visor_hard``,
    ``visor_reasoning``, ``visor_easy`` (those whose family the split holds) and ``visor_all``, each a YAML
    over a JSONL of its records, with the images copied
    beside them (the directory is self-contained). Returns the task names."""
    import shutil

    from . import checks
    from .outputs import write_dir

    data = Path(data)
    checks.count("max_new_tokens", max_new_tokens, 1)
    source = data / f"{split}.jsonl"
    if not source.is_file():
        raise ConfigError(f"{source} not found: point --data at a directory made by `visor data make`")
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    families = {"visor_hard": "hard", "visor_reasoning": "reasoning", "visor_easy": "easy", "visor_all": None}
    names = [n for n, f in families.items() if f is None or any(r.get("family") == f for r in rows)]

    def build(tmp: Path) -> None:
        (tmp / "visor_task_utils.py").write_text(TASK_UTILS)
        for row in rows:
            (tmp / row["image"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(data / row["image"], tmp / row["image"])
        for name in names:
            keep = [r for r in rows if families[name] in (None, r.get("family"))]
            flat = [{k: r.get(k, "") for k in ("image", "question", "answer", "task", "family")} for r in keep]
            (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in flat))
            docs = Path(out).absolute() / f"{name}.jsonl"
            yaml_text = TASK_YAML.format(name=name, docs=json.dumps(str(docs)), max_new_tokens=max_new_tokens)
            (tmp / f"{name}.yaml").write_text(yaml_text)

    write_dir(out, "data lmms-tasks", build, inputs=[data], overwrite=overwrite)
    return names
