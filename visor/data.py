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
import mmap
import os
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
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


def _parse(item, images_dir: Path, open_images: bool = True) -> Record | str:
    """A Record, or the reason the item is unusable (``open_images``: decode-check its images now;
    else only their paths are checked, and loading them later finds a broken one)."""
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
        if not open_images:
            continue
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


# ---- training at scale: records indexed up front, read and loaded when a step needs them ----------


class RecordIndex:
    """Where every record of a training set is, found without keeping or opening anything: the byte
    offset of each non-empty line of a JSONL file, or of each element of an LLaVA JSON list, or of
    those of every shard in a directory (its ``*.jsonl`` files, else its ``*.json`` ones).
    ``get(i)`` reads record i from its file: (where, item or why it is unusable)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():  # *.jsonl shards, else *.json ones (a stray metadata .json beside JSONL shards is no shard)
            self.files = sorted(path.glob("*.jsonl")) or sorted(path.glob("*.json"))
            if not self.files:
                raise InputError(f"{path} holds no *.json or *.jsonl shard")
        elif path.is_file():
            self.files = [path]
        else:
            raise InputError(f"data file not found: {path}")
        parts = [_line_offsets(f) if f.suffix == ".jsonl" else _element_offsets(f) for f in self.files]
        self.file = np.concatenate([np.full(len(p[0]), k, dtype=np.int32) for k, p in enumerate(parts)])
        self.start, self.length, self.number = (np.concatenate([p[j] for p in parts]) for j in range(3))

    def __len__(self) -> int:
        return len(self.start)

    def get(self, i: int) -> tuple[str, object]:
        file = self.files[self.file[i]]
        with open(file, "rb") as f:
            f.seek(int(self.start[i]))
            raw = f.read(int(self.length[i]))
        where = f"{file.name}:{self.number[i]}" if file.suffix == ".jsonl" else f"{file.name}[{self.number[i]}]"
        try:
            return where, json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return where, f"invalid JSON: {getattr(e, 'msg', e)}"


def _line_offsets(file: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, length, 1-based line number) of every non-empty line of a file, without reading it
    into Python objects (a memory map scanned by numpy)."""
    size = file.stat().st_size
    if size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        data = np.frombuffer(m, dtype=np.uint8)
        newlines = np.flatnonzero(data == ord("\n"))
        starts = np.concatenate([[0], newlines + 1])
        ends = np.concatenate([newlines, [size]])
        lines = np.arange(1, len(starts) + 1)
        keep = ends > starts
        starts, ends, lines = starts[keep], ends[keep], lines[keep]
        # lines of whitespace alone are no records (read_records skips them too): only a line that
        # starts with whitespace can be one, and those are few enough to look at one by one
        maybe = np.flatnonzero(np.isin(data[starts], np.frombuffer(b" \t\r", dtype=np.uint8)))
        del data  # the map closes only once no array points into it
        keep = np.ones(len(starts), dtype=bool)
        keep[[j for j in maybe if not m[starts[j] : ends[j]].strip()]] = False
        starts, ends, lines = starts[keep], ends[keep], lines[keep]
    return starts, ends - starts, lines


def _element_offsets(file: Path, chunk: int = 1 << 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, length, index) of every element of the JSON list in a file, parsing one element at a
    time from a window of the file (decoded as latin-1, so that characters are bytes: JSON's own
    syntax is ASCII), so that a file of millions of records never becomes Python objects at once."""
    decoder, starts, ends = json.JSONDecoder(), [], []
    with open(file, "rb") as f:
        text, base, eof = "", 0, False  # text is the file's bytes from offset base

        def read_on() -> None:
            nonlocal text, eof
            more = f.read(chunk)
            eof, text = not more, text + more.decode("latin-1")

        def at(pos: int) -> int:  # the next non-whitespace position, reading on as needed
            while True:
                while pos < len(text) and text[pos] in " \t\r\n":
                    pos += 1
                if pos < len(text) or eof:
                    return pos
                read_on()

        def invalid(pos: int, why: str) -> InputError:
            return InputError(f"{file} is not valid JSON at byte {base + pos}: {why}")

        pos = at(0)
        if text[pos : pos + 1] != "[":
            raise InputError(f"{file} must hold a JSON list of records (LLaVA format) or be a .jsonl file")
        pos = at(pos + 1)
        while text[pos : pos + 1] != "]":
            while True:  # an element may run past the window, or look complete where the window cuts it
                try:
                    end = decoder.raw_decode(text, pos)[1]
                except json.JSONDecodeError as e:
                    cut = e.pos >= len(text) - 8 or e.msg.startswith("Unterminated string")  # by the window's end?
                    if eof or not cut:
                        raise invalid(e.pos, e.msg) from None
                    end = len(text)
                if end < len(text) or eof:
                    break
                read_on()
            starts.append(base + pos)
            ends.append(base + end)
            pos = at(end)
            if text[pos : pos + 1] == ",":
                pos = at(pos + 1)
                if text[pos : pos + 1] == "]":
                    raise invalid(pos, "a ',' before the list's end")
            elif text[pos : pos + 1] != "]":
                raise invalid(pos, "expected ',' or ']' after a record")
            if pos > chunk:  # forget what was parsed (offsets stay the file's)
                text, base, pos = text[pos:], base + pos, 0
        if at(pos + 1) != len(text):
            raise invalid(at(pos + 1), "data after the list")
    start = np.array(starts, dtype=np.int64)
    return start, np.array(ends, dtype=np.int64) - start, np.arange(len(start))


@dataclass
class Example:
    """One training record, tokenized, with its images loaded (their paths instead where the vision
    tower's output for the record is kept: ``TrainSet.kept_towers``)."""

    ids: list[int]
    labels: list[bool]
    images: list
    source: str


@dataclass
class Bad:
    """A record met during training that cannot be used, and why."""

    source: str
    reason: str


class TrainSet(torch.utils.data.Dataset):
    """``RecordIndex`` records parsed, tokenized and their images loaded when asked for (in
    ``DataLoader`` workers): ``Example`` or, for an unusable record, ``Bad``."""

    MEMO = 1024  # the last distinct conversations whose tokens are kept (small or templated sets repeat them)

    def __init__(self, index: RecordIndex, images_dir: str | Path, backbone: Backbone):
        self.index, self.images_dir, self.backbone = index, Path(images_dir), backbone
        self.kept_towers: Container[str] = ()  # records (sources) whose tower output is kept: images not read
        self.memo: dict[tuple, tuple[list[int], list[bool]]] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Example | Bad:
        return self.read(i)

    def read(self, i: int, load_images: bool = True, strict: bool = False) -> Example | Bad:
        """Record i tokenized (``load_images``: with its images), or why it cannot be used. ``strict``:
        an image path leaving the images directory raises (a user's mistake, not one bad record)."""
        where, item = self.index.get(i)
        if isinstance(item, str):
            return Bad(where, item)
        try:
            record = _parse(item, self.images_dir, open_images=False)
        except InputError as e:
            if strict:
                raise InputError(f"{where}: {e}") from None
            return Bad(where, str(e))
        if isinstance(record, str):
            return Bad(where, record)
        try:
            ids, labels = self.tokens(record)
            if not load_images:
                return Example(ids, labels, [], where)
            return Example(ids, labels, record.images if where in self.kept_towers else record.load_images(), where)
        except InputError as e:
            return Bad(where, str(e))
        except Exception as e:  # noqa: BLE001 - a chat template or image decoder refusing a record: skip it
            return Bad(where, f"{e.__class__.__name__}: {e}")

    def tokens(self, record: Record) -> tuple[list[int], list[bool]]:
        """``tokenize``, remembered for the last ``MEMO`` distinct conversations."""
        key = (tuple(record.turns), len(record.images))
        if key not in self.memo:
            if len(self.memo) >= self.MEMO:
                del self.memo[next(iter(self.memo))]  # the oldest
            self.memo[key] = tokenize(self.backbone, record)
        ids, labels = self.memo[key]
        return list(ids), list(labels)

    def first_usable(self) -> Example:
        """The first record that loads: what a micro-batch of unusable records runs instead (weight 0)."""
        for i in range(len(self)):
            item = self[i]
            if isinstance(item, Example):
                return item
        raise InputError("no usable record in the training set")

    def probe(self, n: int = 1000) -> tuple[int, list[str]]:
        """Parse and tokenize the first ``n`` records (paths checked, images not opened) before a run
        starts, so that a wrong --images or a file of bad records fails at once: (usable, reasons)."""
        read = [self.read(i, load_images=False, strict=True) for i in range(min(n, len(self)))]
        return sum(isinstance(x, Example) for x in read), [
            f"{x.source}: {x.reason}" for x in read if isinstance(x, Bad)
        ]
