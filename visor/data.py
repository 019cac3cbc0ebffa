"""Training data: LLaVA conversation JSON or a JSONL of {"image", "question", "answer"}.

    LLaVA:  [{"image": "a.png" | ["a.png", "b.png"],
              "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"},
                                {"from": "gpt", "value": "A cat."}, ...]}, ...]
    JSONL:  {"image": "a.png", "question": "What is it?", "answer": "A cat."}   (one per line)
            {..., "answers": ["A cat.", "cat"]}   every accepted answer, as DocVQA gives them (evaluation
                                                  accepts any; "answer" defaults to the first)

Images resolve under ``images_dir`` and must lie inside it (``..`` or an absolute path is refused;
symbolic links inside it are followed). Every turn is rendered with the checkpoint's chat template
(images first in the first user turn); the loss covers the assistant tokens only, including the
template's end-of-turn token, so the model learns to stop. A bad record (malformed, no assistant
turn, missing or unreadable image) is skipped and reported; a set with no usable record is an error.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .backbone import Backbone, load_image, user_turn
from .errors import InputError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class Record:
    images: list[Path]
    turns: list[tuple[str, str]]  # (role, text), role "user" or "assistant"
    source: str  # "file:line" for messages
    task: str = "all"  # benchmark task and family, where the record says ("task", "family")
    family: str = ""
    references: list[str] | None = None  # every accepted answer (JSONL "answers", as DocVQA's), if given

    def load_images(self) -> list:
        """The record's images as RGB PIL images (InputError if one broke since it was read)."""
        return [load_image(p) for p in self.images]

    @property
    def question(self) -> str:
        return self.turns[0][1]

    @property
    def answer(self) -> str:
        return next(text for role, text in reversed(self.turns) if role == "assistant")

    @property
    def answers(self) -> list[str]:
        """What evaluation accepts: the record's "answers" where it has them, else its answer."""
        return self.references or [self.answer]


def _parse(item, images_dir: Path) -> Record | str:
    """A Record, or the reason the item is unusable."""
    if not isinstance(item, dict):
        return "not a JSON object"
    raw = item.get("image", [])
    names = raw if isinstance(raw, list) else [raw]
    if not all(isinstance(n, str) and n for n in names):
        return "'image' must be a file name or a list of file names"
    answers = item.get("answers")  # every accepted answer (DocVQA's form), for evaluation
    if answers is not None and not (
        isinstance(answers, list) and answers and all(isinstance(a, str) and a.strip() for a in answers)
    ):
        return "'answers' must be a non-empty list of strings"
    if "conversations" in item:
        turns = []
        for turn in item["conversations"] if isinstance(item["conversations"], list) else []:
            role = ROLES.get(turn.get("from") if isinstance(turn, dict) else None)
            if role is None or not isinstance(turn.get("value"), str):
                return "a conversation turn needs 'from' (human/gpt) and a string 'value'"
            turns.append((role, turn["value"].replace("<image>", "").strip()))
    else:
        answer = item.get("answer", answers[0] if answers else None)
        if not (isinstance(item.get("question"), str) and isinstance(answer, str)):
            return "needs 'conversations' or 'question' and 'answer' (or 'answers')"
        turns = [("user", item["question"].strip()), ("assistant", answer.strip())]
    if not any(role == "assistant" and text for role, text in turns):
        return "no assistant turn"
    if turns[0][0] != "user":
        return "the conversation must start with a user turn"
    paths = [images_dir / n for n in names]
    for n, p in zip(names, paths):
        if not Path(os.path.abspath(p)).is_relative_to(os.path.abspath(images_dir)):
            raise InputError(
                f"image {n!r} lies outside the images directory {images_dir}; "
                "image paths must be relative to --images (point --images at a directory that holds them)"
            )
    for p in paths:
        if not p.is_file():
            return f"image not found: {p}"
        try:
            with Image.open(p) as im:
                im.verify()
        except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
            return f"unreadable image {p}: {e.__class__.__name__}"
    references = [a.strip() for a in answers] if answers else None
    return Record(paths, turns, "", str(item.get("task", "all")), str(item.get("family", "")), references)


def read_records(path: str | Path, images_dir: str | Path) -> tuple[list[Record], list[str]]:
    """Usable records and one message per skipped record."""
    path, images_dir = Path(path), Path(images_dir)
    if not path.is_file():
        raise InputError(f"data file not found: {path}")
    text = path.read_text()
    if path.suffix == ".jsonl":
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append((f"{path.name}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    items.append((f"{path.name}:{n}", f"invalid JSON: {e.msg}"))
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, list):
            raise InputError(f"{path} must hold a JSON list of records (LLaVA format) or be a .jsonl file")
        items = [(f"{path.name}[{i}]", item) for i, item in enumerate(data)]
    records, skipped = [], []
    for where, item in items:
        try:
            parsed = item if isinstance(item, str) else _parse(item, images_dir)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
        if isinstance(parsed, str):
            skipped.append(f"{where}: {parsed}")
        else:
            parsed.source = where
            records.append(parsed)
    if not records:
        raise InputError(f"no usable record in {path} ({len(skipped)} skipped; first: {skipped[:1]})")
    return records, skipped


def tokenize(backbone: Backbone, record: Record) -> tuple[list[int], list[bool]]:
    """Token ids (one placeholder per image) and a mask of the answer tokens to learn."""
    messages = []
    for role, text in record.turns:
        if role == "user":
            messages.append(user_turn(text, len(record.images) if not messages else 0))
        else:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
    full = backbone.render(messages, add_generation_prompt=False)
    spans = []
    for j, (role, _) in enumerate(record.turns):
        if role == "assistant":
            prompt = backbone.render(messages[:j], add_generation_prompt=True)
            upto = backbone.render(messages[: j + 1], add_generation_prompt=False)
            if not (full.startswith(upto) and upto.startswith(prompt)):
                raise InputError("the chat template does not render conversations incrementally")
            spans.append((len(prompt), len(upto)))
    enc = backbone.tokenizer(full, return_offsets_mapping=True)
    labels = [any(a <= start < b for a, b in spans) and end > start for start, end in enc["offset_mapping"]]
    return enc["input_ids"], labels
