"""Tiny checkpoints built once per session by the project's own ``tiny-model`` code."""

import numpy as np
import pytest
import torch
from PIL import Image

import visor
from visor.tiny import TinySpec, build_tiny

torch.set_num_threads(2)
ARCHS = ["llava-onevision", "llava"]


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
