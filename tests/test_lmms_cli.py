"""lmms-eval's own CLI evaluating VISOR (budget 0, auto) and a baseline on the built-in tasks, offline.
Needs lmms-eval: `make test-lmms` builds the environment and runs these (`-m lmms`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.lmms
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(*args, cwd):
    done = subprocess.run([*map(str, args)], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=900)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return done


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny VISOR checkpoint with a policy, and the built-in tasks (4 hard + 4 easy test samples)."""
    root = tmp_path_factory.mktemp("lmms")
    visor = [sys.executable, "-m", "visor.cli"]
    run(*visor, "tiny-model", "--out", "base", cwd=root)
    run(*visor, "convert", "--model", "base", "--out", "visor", cwd=root)
    sizes = ["--train", 0, "--val", 8, "--test", 4, "--image-size", 64, "--tasks", "marked_digit,quadrant"]
    run(*visor, "data", "make", "--out", "data", *sizes, cwd=root)
    run(*visor, "train-policy", "--model", "visor", "--data", "data/val.jsonl", "--epochs", 20, "--out", "policy",
        cwd=root)  # fmt: skip
    run(*visor, "data", "lmms-tasks", "--data", "data", "--out", "tasks", cwd=root)
    return root


@pytest.mark.parametrize(
    "name, model_args",
    [("budget0", "budget=0"), ("auto", "budget=auto"), ("fastv", "method=fastv,layer=1,keep=0.25")],
)
def test_lmms_eval_scores_every_sample_and_visor_counts_its_flops(setup, name, model_args):
    out, flops = setup / f"out-{name}", setup / f"flops-{name}.json"
    args = f"pretrained={setup / 'policy' / 'final'},{model_args},flops_file={flops}"
    run(BIN / "lmms-eval", "--model", "visor", "--model_args", args, "--include_path", setup / "tasks",
        "--tasks", "visor_hard,visor_easy", "--device", "cpu", "--batch_size", 4, "--output_path", out,
        "--log_samples", "--verbosity", "DEBUG", cwd=setup)  # fmt: skip
    results = json.loads(next(out.rglob("*_results.json")).read_text())["results"]
    for task in ("visor_hard", "visor_easy"):
        assert {"exact_match,none", "anls,none"} <= results[task].keys(), results[task]
        samples = [json.loads(line) for line in next(out.rglob(f"*_samples_{task}.jsonl")).read_text().splitlines()]
        assert len(samples) == 4 and all("exact_match" in s and "anls" in s for s in samples)
    report = json.loads(flops.read_text())
    assert {t: v["n"] for t, v in report["tasks"].items()} == {"visor_hard": 4, "visor_easy": 4}
    assert all(s["lm_prefill"] > 0 for s in report["samples"])
    if name == "auto":
        assert report["budget"] == "auto" and {s["budget"] for s in report["samples"]} <= {0, 1, 2}
    if name == "fastv":
        assert report["method"] == "fastv" and report["setting"].startswith("FastV(K=1")
