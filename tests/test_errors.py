"""Every user mistake: a one-line VisorError from the CLI, exit code 2, no traceback."""

import json
import shutil
import sys

import pytest
from safetensors.torch import load_file, save_file

from visor.cli import main
from visor.tiny import TinySpec, build_tiny


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["visor", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def assert_user_error(result, message):
    code, out, err = result
    assert code == 2, (code, out, err)
    assert err.startswith("error: ") and message in err, err
    assert "Traceback" not in err + out and len(err.strip().splitlines()) == 1, err


@pytest.fixture(scope="module")
def broken(tmp_path_factory, checkpoints):
    """Copies of the tiny checkpoint, each broken in one way, and bad image files."""
    root = tmp_path_factory.mktemp("broken")
    src = checkpoints["llava-onevision"]
    paths = {}
    for name in ["mismatch", "missing", "truncated", "arch", "visor_truncated"]:
        paths[name] = root / name
        shutil.copytree(src, paths[name])
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["intermediate_size"] += 8
    (paths["mismatch"] / "config.json").write_text(json.dumps(config))
    tensors = load_file(src / "model.safetensors")
    tensors.pop(next(k for k in tensors if "language_model" in k and k.endswith("layers.1.mlp.up_proj.weight")))
    save_file(tensors, paths["missing"] / "model.safetensors", metadata={"format": "pt"})
    weights = (src / "model.safetensors").read_bytes()
    (paths["truncated"] / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (paths["arch"] / "config.json").write_text(json.dumps({**config, "model_type": "paligemma"}))
    from visor.api import convert

    shutil.rmtree(paths["visor_truncated"])
    convert(src, paths["visor_truncated"])
    extra = (paths["visor_truncated"] / "visor.safetensors").read_bytes()
    (paths["visor_truncated"] / "visor.safetensors").write_bytes(extra[: len(extra) // 3])
    paths["short_context"] = build_tiny(root / "short", TinySpec(max_positions=64))
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    (root / "notes.txt").write_text("not an image")
    paths["corrupt"], paths["text"] = root / "corrupt.png", root / "notes.txt"
    return paths


def generate_args(model, image, prompt="What is shown?", *extra):
    return ["generate", "--model", model, "--image", image, "--prompt", prompt, *extra]


def test_missing_image(monkeypatch, capsys, checkpoints, tmp_path):
    r = run_cli(monkeypatch, capsys, *generate_args(checkpoints["llava"], tmp_path / "nope.png"))
    assert_user_error(r, "image not found")


@pytest.mark.parametrize("which", ["corrupt", "text"])
def test_unreadable_image(monkeypatch, capsys, checkpoints, broken, which):
    r = run_cli(monkeypatch, capsys, *generate_args(checkpoints["llava"], broken[which]))
    assert_user_error(r, "cannot read image")


def test_empty_prompt(monkeypatch, capsys, checkpoints, images):
    assert_user_error(
        run_cli(monkeypatch, capsys, *generate_args(checkpoints["llava"], images[0], "  ")), "prompt is empty"
    )


def test_prompt_longer_than_the_context(monkeypatch, capsys, broken, images):
    r = run_cli(monkeypatch, capsys, *generate_args(broken["short_context"], images[1], "tell me " * 20))
    assert_user_error(r, "over the model's context of 64")


def test_unknown_budget(monkeypatch, capsys, checkpoints, images):
    r = run_cli(monkeypatch, capsys, *generate_args(checkpoints["llava"], images[0], "Hi", "--budget", "7"))
    assert_user_error(r, "unknown budget 7: use an integer 0..2")


def test_schedule_that_does_not_fit(monkeypatch, capsys, checkpoints, images):
    r = run_cli(monkeypatch, capsys, *generate_args(checkpoints["llava"], images[0], "Hi", "--schedule", "sa,ca,text"))
    assert_user_error(r, "has 3 roles but the language model has 6 layers")


@pytest.mark.parametrize(
    "which, message",
    [
        ("mismatch", "do not match its config.json"),
        ("missing", "layers.1.mlp.up_proj.weight (missing from the file)"),
        ("truncated", "cannot load the weights"),
        ("arch", "unsupported architecture 'paligemma'; supported: llava_onevision"),
        ("visor_truncated", "truncated or corrupt"),
    ],
)
def test_broken_checkpoints(monkeypatch, capsys, broken, images, which, message):
    assert_user_error(run_cli(monkeypatch, capsys, *generate_args(broken[which], images[0])), message)


def test_not_a_checkpoint(monkeypatch, capsys, tmp_path):
    r = run_cli(monkeypatch, capsys, "flops", "--model", tmp_path, "--visual-tokens", 10, "--text-tokens", 5)
    assert_user_error(r, "no config.json")


def test_flops_needs_a_model_or_a_config(monkeypatch, capsys):
    r = run_cli(monkeypatch, capsys, "flops", "--visual-tokens", 10, "--text-tokens", 5)
    assert_user_error(r, "exactly one of --model")
