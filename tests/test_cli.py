"""The README's commands, run as a new user runs them: the installed `visor` console script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    assert (tmp_path / "card.json").is_file() and len((tmp_path / "test.jsonl").read_text().splitlines()) == 10
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
    assert out["method"] == "pdrop" and out["summary"]["overall"]["n"] == 10
    assert set(out["summary"]["family"]) == {"hard", "reasoning", "easy"}


def test_every_model_command_honours_device_and_dtype(tmp_path, checkpoints, dataset):
    """bfloat16 on the CPU through eval, compare, train-policy and generate; results say what ran."""
    model, data = checkpoints["llava-onevision"], ["--data", dataset / "train.jsonl", "--images", dataset / "img"]
    bf16 = ["--device", "cpu", "--dtype", "bfloat16"]
    visor_cli("eval", "--model", model, *data, "--limit", 2, "--max-new-tokens", 2, "--out", tmp_path / "e", *bf16)
    result = json.loads((tmp_path / "e" / "result.json").read_text())
    assert (result["device"], result["dtype"]) == ("cpu", "bfloat16")
    assert result["modes"] == {"prefill": "eager", "decode": "dynamic"}  # "auto" on the CPU
    printed = visor_cli("train-policy", "--model", model, *data, "--epochs", 2, "--out", tmp_path / "p", *bf16)
    report = json.loads((tmp_path / "p" / "policy_report.json").read_text())
    assert report["dtype"] == "bfloat16"
    assert report["epochs_fitted"] == 2 and "2 of at most 2 epochs" in " ".join(printed.split())  # 13 samples: all
    visor_cli("compare", "--model", tmp_path / "p" / "final", *data, "--limit", 1, "--max-new-tokens", 2,
              "--out", tmp_path / "c", *bf16)  # fmt: skip
    assert {r["dtype"] for r in json.loads((tmp_path / "c" / "results.json").read_text())["results"]} == {"bfloat16"}
    out = json.loads(visor_cli("generate", "--model", model, "--prompt", "Hi", "--max-new-tokens", 2, "--json", *bf16))
    assert len(out["token_ids"]) <= 2
    import visor

    loaded = visor.load(model, dtype="bfloat16", device="cpu")
    assert loaded.lm.lm_head.weight.dtype == torch.bfloat16 and loaded.backbone.device.type == "cpu"


def test_flops_counts_the_tokens_of_an_image(checkpoints, images):
    model = checkpoints["llava-onevision"]
    counted = json.loads(visor_cli("flops", "--model", model, "--image", images[1], "--prompt", "What?", "--json"))
    out = json.loads(visor_cli("generate", "--model", model, "--image", images[1], "--prompt", "What?", "--json"))
    given = json.loads(
        visor_cli(
            "flops", "--model", model, "--visual-tokens", out["n_visual"], "--text-tokens", out["n_text"], "--json"
        )
    )
    assert counted["prefill"] == given["prefill"] == out["flops"]["prefill"]  # vision crops counted alike
    assert counted["lm_prefill"] == out["flops"]["lm_prefill"]


def test_default_budget_is_the_cheap_one_on_a_visor_checkpoint(checkpoints, tmp_path, images):
    import visor

    assert visor.load(checkpoints["llava"]).default_budget == "full"  # a base checkpoint: the base model
    converted = visor.load(visor.convert(checkpoints["llava"], tmp_path / "v"))
    assert converted.default_budget == 2 and converted.generate(images[0], "Hi", max_new_tokens=1).budget == 2
    out = json.loads(visor_cli("generate", "--model", tmp_path / "v", "--image", images[0], "--prompt", "Hi", "--json"))
    assert out["budget"] == 2
