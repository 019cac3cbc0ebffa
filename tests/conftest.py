"""Tiny checkpoints built once per session by the project's own ``tiny-model`` code."""

import numpy as np
import pytest
import torch
from PIL import Image

import visor
from visor.generate import Decoder, collate
from visor.tiny import TinySpec, build_tiny

torch.set_num_threads(2)
ARCHS = ["llava-onevision", "llava", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "internvl"]


def random_image(path, width, height, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return str(path)


def set_visor_weights(model, seed=0, scale=1.0):
    """Give every CA gate (and the conv positional code) non-zero values, deterministically."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.lm.visor_state_dict().items():
            if name.endswith("gate"):
                p.fill_(scale)
            elif "pos_conv.pointwise" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def extended(sample, new_ids):
    """The sample with ``new_ids`` appended as text (positions continuing after its last token)."""
    import dataclasses

    positions = sample.positions
    if positions is not None:  # multimodal RoPE: text continues one past the last position, all three alike
        positions = torch.cat([positions, positions[-1] + 1 + torch.arange(len(new_ids))[:, None]])
    return dataclasses.replace(sample, ids=sample.ids + new_ids, positions=positions)


def greedy(model, samples, n_new, budget, decode="dynamic", drops=None):
    """Greedy tokens and per-step logits through prefill + cached decode (``drops``: token dropping)."""
    tok = collate(samples, model.backbone.image_token_id, "cpu")
    with torch.no_grad():
        logits, cache, *_ = model.lm.prefill(tok, budget, capacity=tok.text_ids.shape[1] + n_new, drops=drops)
        decoder = Decoder(model.lm, cache, decode)
        steps, tokens = [logits], []
        for _ in range(n_new - 1):
            tokens.append(logits.argmax(-1))
            logits = decoder(tokens[-1]).clone()
            steps.append(logits)
    tokens.append(logits.argmax(-1))
    return torch.stack(tokens, 1), torch.stack(steps, 1)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: build_tiny(root / arch, TinySpec(arch=arch)) for arch in ARCHS}


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("img")
    sizes = [(40, 30), (70, 50), (32, 32), (50, 90)]  # different AnyRes grids -> different token counts
    return [random_image(root / f"im{i}.png", w, h, seed=i) for i, (w, h) in enumerate(sizes)]


@pytest.fixture(scope="session", params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="session")
def base_model(checkpoints, arch):
    """A base checkpoint loaded with the default schedule. Tests must not modify it."""
    return visor.load(checkpoints[arch])


@pytest.fixture
def visor_model(checkpoints, arch):
    """A freshly loaded model with non-zero CA gates: budgets really differ."""
    model = visor.load(checkpoints[arch])
    set_visor_weights(model)
    return model


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def colour_dataset(root, n=16, seed=0):
    """A tiny VQA set: which colour fills the image (varied sizes); JSONL and LLaVA JSON."""
    import json
    import random

    rng = random.Random(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = rng.choice(sorted(COLOURS))
        Image.new("RGB", (32 + 8 * (i % 4), 32 + 8 * (i % 3)), COLOURS[name]).save(root / "img" / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": "Which colour dominates?", "answer": name})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    turns = lambda r: [{"from": "human", "value": "<image>\n" + r["question"]}, {"from": "gpt", "value": r["answer"]}]  # noqa: E731
    llava = [{"image": r["image"], "conversations": turns(r)} for r in rows]
    (root / "train.json").write_text(json.dumps(llava))
    return root


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    return colour_dataset(tmp_path_factory.mktemp("data"))
