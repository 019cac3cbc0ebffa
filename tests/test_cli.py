"""The README's commands, run as a new user runs them: the installed `visor` console script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

VISOR = [str(Path(sys.executable).with_name("visor"))]  # the console script of this environment


def visor_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([*VISOR, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("arch", ["llava-onevision", "llava"])
def test_tiny_model_generate_convert_flops(tmp_path, arch, images):
    base, converted = tmp_path / "base", tmp_path / "visor"
    visor_cli("tiny-model", "--arch", arch, "--out", base)
    for name in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
        "processor_config.json",
        "chat_template.jinja",
    ]:
        assert (base / name).is_file(), name

    out = json.loads(
        visor_cli(
            "generate",
            "--model",
            base,
            "--image",
            images[0],
            "--prompt",
            "What is shown?",
            "--budget",
            "2",
            "--max-new-tokens",
            "5",
            "--json",
        )
    )
    assert {"text", "token_ids", "budget", "flops"} <= out.keys()
    assert out["budget"] == 2 and 1 <= len(out["token_ids"]) <= 5 and isinstance(out["text"], str)
    assert out["flops"]["total"] == out["flops"]["prefill"] + out["flops"]["decode"] > 0

    visor_cli("convert", "--model", base, "--out", converted, "--schedule", "sa,ca,text,sa,ca,sa")
    assert json.loads((converted / "visor.json").read_text())["schedule"]["roles"][-1] == "sa"
    out = json.loads(
        visor_cli(
            "generate",
            "--model",
            converted,
            "--image",
            images[1],
            "--image",
            images[2],
            "--prompt",
            "Compare them.",
            "--budget",
            "0",
            "--json",
            "--max-new-tokens",
            "3",
        )
    )
    assert out["budget"] == 0

    report = json.loads(
        visor_cli("flops", "--model", converted, "--visual-tokens", 500, "--text-tokens", 20, "--budget", "1", "--json")
    )
    assert {"prefill", "decode_per_token", "breakdown"} <= report.keys()
    assert report["breakdown"]["prefill"]["cross_attention"] > 0
    assert report["prefill"] == sum(report["breakdown"]["prefill"].values())
    assert [layer["role"] for layer in report["layers"]] == ["sa", "ca", "text", "text", "ca", "text"]


def test_flops_from_a_config_file_only():
    config = Path(__file__).parents[1] / "visor" / "configs" / "llava-onevision-qwen2-7b.json"
    text = visor_cli("flops", "--config", config, "--visual-tokens", 7290, "--text-tokens", 64, "--budget", 2)
    assert "vision_tower" in text and "fewer FLOPs" in text


def test_data_make_and_eval(tmp_path, checkpoints):
    visor_cli("data", "make", "--out", tmp_path, "--train", 1, "--val", 0, "--test", 1, "--image-size", 64)
    assert (tmp_path / "card.json").is_file() and len((tmp_path / "test.jsonl").read_text().splitlines()) == 9
    out = json.loads(
        visor_cli(
            "eval",
            "--model",
            checkpoints["llava"],
            "--data",
            tmp_path / "test.jsonl",
            "--method",
            "pdrop",
            "--stages",
            "2,4",
            "--ratio",
            0.5,
            "--max-new-tokens",
            2,
            "--json",
        )
    )
    assert out["method"] == "pdrop" and out["summary"]["overall"]["n"] == 9
    assert set(out["summary"]["family"]) == {"hard", "easy"}
