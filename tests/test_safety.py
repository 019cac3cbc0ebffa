"""Bad input on every command: one `error:` line and exit code 2, and nothing of the user's touched.

``world`` holds, once per module, every kind of thing a user might point a command at: checkpoints
(good, broken in one way each), images (good, corrupt, huge), data sets, a directory of the user's
own files, earlier outputs of visor's own commands. Each row of ``CLI_CASES`` runs one bad command
line through the real CLI and then checks that nothing in ``world`` changed.
"""

import hashlib
import json
import shutil
import struct
import sys
import zlib
from pathlib import Path

import pytest
import torch
from conftest import colour_dataset, random_image

import visor
from visor.cli import main
from visor.evaluate import write_result
from visor.synth import make_dataset
from visor.tiny import TinySpec, build_tiny
from visor.train import TrainConfig, train


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that claims width x height pixels (PIL reads the size before any pixel)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    data = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    path.write_bytes(data + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))
    return path


def with_visor_json(src: Path, dst: Path, meta) -> Path:
    shutil.copytree(src, dst)
    (dst / "visor.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory, checkpoints):
    root = tmp_path_factory.mktemp("world")
    w = {"root": root, "ckpt": checkpoints["llava-onevision"], "scratch": root / "scratch"}
    w["scratch"].mkdir()
    w["visor"] = visor.convert(w["ckpt"], root / "visor")
    good = json.loads((w["visor"] / "visor.json").read_text())
    broken = {
        "no_schedule": {"format_version": 1},
        "list_json": [1, 2],
        "str_version": {**good, "format_version": "1"},
        "future": {**good, "format_version": 99},
        "bad_json": "{not json",
        "bad_policy": {**good, "policy": "yes"},
    }
    for name, meta in broken.items():
        w[name] = with_visor_json(w["visor"], root / name, meta)
    w["fewer_layers"] = root / "fewer_layers"
    shutil.copytree(w["ckpt"], w["fewer_layers"])
    config = json.loads((w["ckpt"] / "config.json").read_text())
    text = {k: v for k, v in config["text_config"].items() if k != "layer_types"} | {"num_hidden_layers": 3}
    (w["fewer_layers"] / "config.json").write_text(json.dumps(config | {"text_config": text}))
    w["short"] = build_tiny(root / "short", TinySpec(max_positions=64))
    w["nosa"] = visor.convert(w["ckpt"], root / "nosa", schedule="ca,text,ca,text,ca,text")

    images = root / "images"
    images.mkdir()
    w["img"] = random_image(images / "good.png", 40, 30)
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    (images / "notes.txt").write_text("not an image")
    (images / "empty.png").write_bytes(b"")
    (images / "folder.png").mkdir()
    png_header(images / "bomb.png", 100_000, 100_000)  # over twice the limit: PIL refuses it
    png_header(images / "big.png", 10_000, 10_000)  # between one and two times: PIL would only warn
    w["images"] = images

    w["data"] = colour_dataset(root / "data", n=6)
    rows = (w["data"] / "train.jsonl").read_text().splitlines()
    variants = {
        "escape": {"image": "../../images/good.png", "question": "q", "answer": "a"},
        "absolute": {"image": str(images / "good.png"), "question": "q", "answer": "a"},
    }
    for name, row in variants.items():
        (w["data"] / f"{name}.jsonl").write_text("\n".join([rows[0], json.dumps(row)]) + "\n")
    (w["data"] / "no_answers.jsonl").write_text(json.dumps({"image": "0.png", "question": "q"}) + "\n")
    configs = {
        "scalar": "12\n",
        "list": "- 1\n- 2\n",
        "wrong_type": "steps: many\n",
        "bool_type": "resume: 3\n",
        "unknown": "learning_rate: 0.1\n",
        "invalid": "steps: [1,\n",
    }
    for name, text in configs.items():
        (root / f"{name}.yaml").write_text(text)

    user = root / "user"  # somebody's own files
    (user / "sub").mkdir(parents=True)
    (user / "thesis.tex").write_text("\\documentclass{article} years of work")
    (user / "sub" / "notes.md").write_text("notes")
    w["user"] = user
    w["proj"] = root / "proj"  # a project holding the model: --out proj would contain the input
    shutil.copytree(w["ckpt"], w["proj"] / "base")
    (w["proj"] / "thesis.tex").write_text("more work")
    (root / "afile.txt").write_text("a file, not a directory")

    # earlier outputs of our own commands
    make_dataset(root / "bench", 0, {"train": 2, "val": 0, "test": 2}, ["quadrant"], 64, 1, progress=False)
    result = visor.load(w["ckpt"])
    from visor.evaluate import evaluate

    result = evaluate(result, w["data"] / "train.jsonl", w["data"] / "img", limit=2, max_new_tokens=2, progress=False)
    write_result(root / "eval_out", result)
    train(TrainConfig(model=str(w["ckpt"]), data=str(w["data"] / "train.jsonl"), images=str(w["data"] / "img"),
                      out=str(root / "run"), steps=1, batch_size=2, stage=1))  # fmt: skip
    shutil.copytree(w["visor"], root / "mixed")  # ours, with a file of the user's added later
    (root / "mixed" / "notes.txt").write_text("mine")
    return w


def snapshot(root: Path) -> dict:
    """Every file (but scratch/): bytes for small files, size + inode + mtime for the others."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[0] == "scratch":
            continue
        if path.is_file():
            st = path.stat()
            small = st.st_size < 200_000
            state[str(rel)] = (
                hashlib.sha256(path.read_bytes()).hexdigest() if small else (st.st_size, st.st_ino, st.st_mtime_ns)
            )
        else:
            state[str(rel)] = "dir"
    return state


def run_cli(monkeypatch, capsys, args):
    monkeypatch.setattr(sys, "argv", ["visor", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def assert_one_error(code, out, err, message):
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, (code, out[-2000:], err[-2000:])
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err
    assert message in errors[0], errors[0]
    assert "Traceback" not in err + out, err


G = "generate --model {ckpt} --image {img} --prompt Hi"
GV = "generate --model {visor} --image {img} --prompt Hi"
T = "train --model {ckpt} --data {data}/train.jsonl --images {data}/img --steps 1 --batch-size 2 --out {scratch}/run"
P = "train-policy --model {visor} --data {data}/train.jsonl --images {data}/img --epochs 1"
E = "eval --model {ckpt} --data {data}/train.jsonl --images {data}/img --limit 1 --max-new-tokens 2"
C = "compare --model {visor} --data {data}/train.jsonl --images {data}/img --limit 1"
D = "data make --train 1 --val 0 --test 1 --image-size 64 --workers 1 --tasks quadrant"

CLI_CASES = [
    # generate: options
    ("gen-max-new-negative", G + " --max-new-tokens -5", "max_new_tokens must be an integer >= 1"),
    ("gen-max-new-zero", G + " --max-new-tokens 0", "max_new_tokens must be an integer >= 1"),
    ("gen-max-new-text", G + " --max-new-tokens abc", "Invalid value for '--max-new-tokens'"),
    ("gen-temperature-negative", G + " --temperature -1", "temperature must be a number >= 0"),
    ("gen-temperature-nan", G + " --temperature nan", "temperature must be a number >= 0"),
    ("gen-top-p-zero", G + " --top-p 0", "top_p must be a number > 0 and <= 1"),
    ("gen-top-p-two", G + " --top-p 2", "top_p must be a number > 0 and <= 1"),
    ("gen-top-p-negative", G + " --top-p -0.5", "top_p must be a number"),
    ("gen-seed-negative", G + " --seed -1", "seed must be an integer >= 0"),
    ("gen-device-nonsense", G + " --device nonsense", "unknown device 'nonsense'"),
    ("gen-device-cuda", G + " --device cuda:99", "device 'cuda:99': "),  # no CUDA, or not 100 GPUs
    ("gen-device-cuda-index", G + " --device cuda:-1", "unknown device 'cuda:-1'"),
    ("gen-device-mps", G + " --device mps", "unknown device 'mps'"),
    ("gen-dtype-float64", G + " --dtype float64", "unknown dtype 'float64'"),
    ("gen-dtype-nonsense", G + " --dtype half-ish", "unknown dtype"),
    ("gen-decode-unknown", G + " --decode turbo", "unknown decode mode 'turbo'"),
    ("gen-decode-graph-on-cpu", G + " --device cpu --decode graph", "needs a CUDA device"),
    ("gen-prefill-unknown", G + " --prefill turbo", "unknown prefill mode 'turbo'"),
    ("gen-prefill-graph-on-cpu", G + " --device cpu --prefill compile-graph", "needs a CUDA device"),
    ("gen-budget-too-large", G + " --budget 99", "unknown budget 99"),
    ("gen-budget-negative", G + " --budget -1", "unknown budget"),
    ("gen-budget-word", G + " --budget most", "unknown budget 'most'"),
    ("gen-budget-auto-no-policy", G + " --budget auto", "needs a trained policy"),
    ("gen-budget-auto-no-sa", "generate --model {nosa} --image {img} --prompt Hi --budget auto", "has none"),
    ("gen-unknown-option", G + " --colour red", "No such option"),
    ("gen-no-prompt", "generate --model {ckpt} --image {img}", "Missing option '--prompt'"),
    # generate: images
    ("img-missing", "generate --model {ckpt} --image {images}/nope.png --prompt Hi", "image not found"),
    ("img-corrupt", "generate --model {ckpt} --image {images}/corrupt.png --prompt Hi", "cannot read image"),
    ("img-text", "generate --model {ckpt} --image {images}/notes.txt --prompt Hi", "cannot read image"),
    ("img-zero-bytes", "generate --model {ckpt} --image {images}/empty.png --prompt Hi", "cannot read image"),
    ("img-directory", "generate --model {ckpt} --image {images}/folder.png --prompt Hi", "image not found"),
    ("img-bomb", "generate --model {ckpt} --image {images}/bomb.png --prompt Hi", "decompression-bomb limit of"),
    ("img-big", "generate --model {ckpt} --image {images}/big.png --prompt Hi", "10000 x 10000 = 100,000,000 pixels"),
    ("img-second-missing", G + " --image {images}/nope.png", "image not found"),
    # generate: prompts
    ("prompt-empty", "generate --model {ckpt} --image {img} --prompt '  '", "the prompt is empty"),
    ("prompt-image-token", "generate --model {ckpt} --image {img} --prompt <image>Hi", "image placeholder"),
    ("prompt-too-long", "generate --model {short} --image {img} --prompt " + "long" * 80, "over the model's context"),
    # generate: checkpoints and schedules
    ("model-missing", "generate --model {root}/nothing --image {img} --prompt Hi", "no config.json"),
    ("model-is-image", "generate --model {img} --image {img} --prompt Hi", "is not valid JSON"),
    ("schedule-bad-role", G + " --schedule sa,xx,text,sa,ca,text", "unknown layer role"),
    ("schedule-wrong-depth", G + " --schedule sa,ca,text", "has 3 roles but the language model has 6"),
    ("schedule-file-missing", G + " --schedule {root}/none.yaml", "schedule file not found"),
    ("schedule-on-visor", GV + " --schedule sa,ca,text,sa,ca,text", "its own schedule"),
    ("visor-json-no-schedule", "generate --model {no_schedule} --image {img} --prompt Hi", 'no "schedule"'),
    ("visor-json-list", "generate --model {list_json} --image {img} --prompt Hi", "must hold a JSON object"),
    ("visor-json-str-version", "generate --model {str_version} --image {img} --prompt Hi", "must be an integer"),
    ("visor-json-future", "generate --model {future} --image {img} --prompt Hi", "upgrade visor-lvlm"),
    ("visor-json-invalid", "generate --model {bad_json} --image {img} --prompt Hi", "is not valid JSON"),
    ("visor-json-policy", "generate --model {bad_policy} --image {img} --prompt Hi", '"policy" must be an object'),
    (
        "config-fewer-layers",
        "generate --model {fewer_layers} --image {img} --prompt Hi --schedule sa,ca,text",
        "in the file, not in the config",
    ),  # fmt: skip
    # flops
    ("flops-visual-negative", "flops --model {ckpt} --visual-tokens -1 --text-tokens 5", "visual tokens must be"),
    ("flops-text-negative", "flops --model {ckpt} --visual-tokens 10 --text-tokens -5", "text tokens must be"),
    ("flops-text-zero", "flops --model {ckpt} --visual-tokens 10 --text-tokens 0", "text tokens must be"),
    ("flops-crops-negative", "flops --model {ckpt} --visual-tokens 10 --text-tokens 5 --crops -2", "crops must be"),
    ("flops-neither", "flops --visual-tokens 10 --text-tokens 5", "exactly one of --model"),
    (
        "flops-both",
        "flops --model {ckpt} --config {ckpt}/config.json --visual-tokens 1 --text-tokens 1",
        "exactly one of --model",
    ),  # fmt: skip
    ("flops-budget", "flops --model {ckpt} --visual-tokens 10 --text-tokens 5 --budget 9", "unknown budget 9"),
    ("flops-config-missing", "flops --config {root}/none.json --visual-tokens 1 --text-tokens 1", "no config.json"),
    # convert: where it writes
    ("convert-into-user-files", "convert --model {ckpt} --out {user}", "visor did not write it"),
    ("convert-into-user-files-overwrite", "convert --model {ckpt} --out {user} --overwrite", "visor did not write it"),
    ("convert-out-parent-of-input", "convert --model {proj}/base --out {proj}", "contains the input"),
    ("convert-out-parent-overwrite", "convert --model {proj}/base --out {proj} --overwrite", "contains the input"),
    ("convert-out-is-input", "convert --model {ckpt} --out {ckpt}", "is the input"),
    ("convert-out-is-input-overwrite", "convert --model {visor} --out {visor} --overwrite", "is the input"),
    ("convert-out-is-file", "convert --model {ckpt} --out {root}/afile.txt", "is a file"),
    ("convert-over-ours", "convert --model {ckpt} --out {visor}", "pass --overwrite"),
    ("convert-over-eval-output", "convert --model {ckpt} --out {root}/eval_out --overwrite", "`visor eval`"),
    ("convert-over-ours-with-user-file", "convert --model {ckpt} --out {root}/mixed --overwrite", "notes.txt"),
    (
        "convert-position-encoding",
        "convert --model {ckpt} --out {scratch}/c1 --position-encoding alibi",
        "unknown position encoding",
    ),  # fmt: skip
    (
        "convert-visor-new-schedule",
        "convert --model {visor} --out {scratch}/c2 --schedule sa,ca,text,sa,ca,text",
        "already a VISOR checkpoint",
    ),  # fmt: skip
    ("convert-model-missing", "convert --model {root}/nothing --out {scratch}/c3", "no config.json"),
    ("tiny-into-user-files", "tiny-model --out {user}", "visor did not write it"),
    ("tiny-over-ours", "tiny-model --out {visor}", "pass --overwrite"),
    ("tiny-layers-zero", "tiny-model --out {scratch}/t1 --layers 0", "layers must be an integer >= 1"),
    ("tiny-heads", "tiny-model --out {scratch}/t2 --hidden 30 --heads 4", "divisible"),
    ("tiny-patch", "tiny-model --out {scratch}/t3 --image-size 30 --patch-size 8", "multiple of patch_size"),
    ("tiny-arch", "tiny-model --out {scratch}/t4 --arch qwen", "unknown --arch 'qwen'"),
    # train: options
    ("train-lr-negative", T + " --lr -1", "lr must be a number > 0"),
    ("train-lr-zero", T + " --lr 0", "lr must be a number > 0"),
    ("train-steps-negative", T + " --steps -1", "steps must be an integer >= 0"),
    ("train-save-every-negative", T + " --save-every -1", "save_every must be an integer >= 0"),
    ("train-batch-zero", T + " --batch-size 0", "batch_size must be an integer >= 1"),
    ("train-grad-accum-zero", T + " --grad-accum 0", "grad_accum must be an integer >= 1"),
    ("train-epochs-zero", T + " --epochs 0", "epochs must be a number > 0"),
    ("train-warmup-negative", T + " --warmup-steps -3", "warmup_steps must be an integer >= 0"),
    ("train-min-lr-ratio", T + " --min-lr-ratio 2", "min_lr_ratio must be a number >= 0 and <= 1"),
    ("train-clip-negative", T + " --clip -1", "clip must be a number >= 0"),
    ("train-seed-negative", T + " --seed -2", "seed must be an integer >= 0"),
    ("train-weights-zero", T + " --budgets 0-2 --budget-weights 0,0,0", "all zero"),
    ("train-weights-negative", T + " --budgets 0-2 --budget-weights -1,1,1", "a budget weight must be"),
    ("train-weights-text", T + " --budget-weights a,b", "must be numbers separated by commas"),
    ("train-weights-count", T + " --budgets 0-2 --budget-weights 1,1", "2 budget weights for 3 budgets"),
    ("train-budgets-range", T + " --budgets 0-9", "unknown budget 3"),
    ("train-budgets-bad-range", T + " --budgets x-y", "bad budget range"),
    ("train-stage", T + " --stage 3", "--stage must be 1 or 2"),
    ("train-device-nonsense", T + " --device nonsense", "unknown device"),
    ("train-device-cuda", T + " --device cuda:99", "device 'cuda:99': "),
    ("train-resume-and-overwrite", T + " --resume --overwrite", "choose one"),
    ("train-dtype-float16", T + " --dtype float16", "would need loss scaling"),
    ("train-dtype-unknown", T + " --dtype half", "unknown dtype 'half'"),
    ("train-workers-negative", T + " --workers -1", "workers must be an integer >= 0"),
    ("train-max-bad-two", T + " --max-bad 2", "max_bad must be a number >= 0 and <= 1"),
    ("train-data-empty-dir", T + " --data {root}", "holds no *.json or *.jsonl shard"),
    (
        "train-no-model",
        "train --data {data}/train.jsonl --images {data}/img --out {scratch}/r",
        "--model and --data are required",
    ),
    # train: config files
    ("train-config-scalar", T + " --config {root}/scalar.yaml", "must hold a mapping of options"),
    ("train-config-list", T + " --config {root}/list.yaml", "must hold a mapping of options"),
    ("train-config-wrong-type", T + " --config {root}/wrong_type.yaml", "steps must be int, not 'many'"),
    ("train-config-bool", T + " --config {root}/bool_type.yaml", "resume must be bool"),
    ("train-config-unknown", T + " --config {root}/unknown.yaml", "unknown keys"),
    ("train-config-invalid", T + " --config {root}/invalid.yaml", "cannot read config"),
    ("train-config-missing", T + " --config {root}/none.yaml", "cannot read config"),
    # train: data and where it writes
    ("train-image-escapes", T + " --data {data}/escape.jsonl --images {data}/img", "lies outside the images directory"),
    ("train-image-absolute", T + " --data {data}/absolute.jsonl --images {data}/img", "lies outside"),
    ("train-data-missing", T + " --data {data}/none.jsonl", "data file not found"),
    ("train-no-usable-record", T + " --data {data}/no_answers.jsonl", "no usable record"),
    ("train-out-user-files", T + " --out {user}", "visor did not write it"),
    ("train-out-is-file", T + " --out {root}/afile.txt", "is a file"),
    ("train-out-contains-data", T + " --out {data}", "contains the input"),
    ("train-out-is-model", T + " --out {ckpt}", "is the input"),
    ("train-rerun", T + " --out {root}/run", "pass --resume to continue it or --overwrite"),
    ("train-resume-other-lr", T + " --out {root}/run --resume --lr 0.5", "lr: 0.0001 -> 0.5"),
    ("train-resume-eval-output", T + " --out {root}/eval_out --resume", "`visor eval`"),
    ("train-overwrite-user-file", T + " --out {root}/mixed --overwrite", "holds a checkpoint, not"),
    # train-policy
    ("policy-out-user-files", P + " --out {user}", "visor did not write it"),
    ("policy-out-is-model", P + " --out {visor}", "is the input"),
    ("policy-epochs-zero", P + " --out {scratch}/p --epochs 0", "epochs must be an integer >= 1"),
    ("policy-width-zero", P + " --out {scratch}/p --width 0", "width must be an integer >= 1"),
    ("policy-lr-negative", P + " --out {scratch}/p --lr -1", "lr must be a number > 0"),
    ("policy-cost-negative", P + " --out {scratch}/p --cost-weight -1", "cost_weight must be a number >= 0"),
    ("policy-batch-zero", P + " --out {scratch}/p --batch-size 0", "batch_size must be an integer >= 1"),
    (
        "policy-no-sa",
        "train-policy --model {nosa} --data {data}/train.jsonl --images {data}/img --out {scratch}/p2",
        "no SA candidate",
    ),
    # eval
    ("compare-prefill-unknown", C + " --out {scratch}/cmp --prefill turbo", "unknown prefill mode 'turbo'"),
    ("eval-out-is-file", E + " --out {root}/afile.txt", "is a file"),
    ("eval-out-user-files", E + " --out {user}", "visor did not write it"),
    ("eval-out-earlier", E + " --out {root}/eval_out", "pass --overwrite"),
    ("eval-out-contains-data", E + " --out {data}", "contains the input"),
    ("eval-out-checkpoint", E + " --out {visor} --overwrite", "holds a checkpoint, not"),
    ("eval-stages-text", E + " --method pdrop --stages abc", "--stages must be integers"),
    ("eval-batch-zero", E + " --batch-size 0", "batch_size must be an integer >= 1"),
    ("eval-limit-zero", E + " --limit 0", "limit must be an integer >= 1"),
    ("eval-limit-negative", E + " --limit -1", "limit must be an integer >= 1"),
    ("eval-max-new-zero", E + " --max-new-tokens 0", "max_new_tokens must be an integer >= 1"),
    ("eval-method", E + " --method prune", "unknown method 'prune'"),
    ("policy-holdout-one", P + " --out {scratch}/pol --holdout 1", "holdout must be a number >= 0 and <= 0.9"),
    ("eval-prefill-graph-on-cpu", E + " --device cpu --prefill graph", "needs a CUDA device"),
    ("eval-decode-unknown", E + " --decode turbo", "unknown decode mode 'turbo'"),
    ("eval-keep-zero", E + " --method fastv --keep 0", "--keep and --ratio are fractions"),
    ("eval-keep-two", E + " --method fastv --keep 2", "--keep and --ratio are fractions"),
    ("eval-ratio-zero", E + " --method pdrop --ratio 0", "--keep and --ratio are fractions"),
    ("eval-dominant-zero", E + " --method visionzip --dominant 0", "--dominant must be at least 1"),
    ("eval-fastv-layer", E + " --method fastv --layer 99", "prune points [99]"),
    ("eval-budget", E + " --budget 99", "unknown budget 99"),
    ("eval-image-escapes", E + " --data {data}/escape.jsonl --images {data}/img", "lies outside"),
    ("eval-data-missing", E + " --data {data}/none.jsonl", "data file not found"),
    # compare
    ("compare-out-user-files", C + " --out {user}", "visor did not write it"),
    ("compare-out-is-file", C + " --out {root}/afile.txt", "is a file"),
    ("compare-out-eval", C + " --out {root}/eval_out --overwrite", "`visor eval`"),
    ("compare-out-is-model", C + " --out {visor}", "is the input"),
    # data make
    ("data-image-size-zero", D + " --out {scratch}/d --image-size 0", "image_size must be an integer >= 64"),
    ("data-image-size-small", D + " --out {scratch}/d --image-size 16", "image_size must be an integer >= 64"),
    ("data-workers-zero", D + " --out {scratch}/d --workers 0", "workers must be an integer >= 1"),
    ("data-train-negative", D + " --out {scratch}/d --train -5", "samples per task of train must be"),
    ("data-nothing", D + " --out {scratch}/d --test 0 --train 0", "no samples to make"),
    ("data-tasks", D + " --out {scratch}/d --tasks quadrant,nonsense", "unknown task(s) ['nonsense']"),
    ("data-out-is-file", D + " --out {root}/afile.txt", "is a file"),
    ("data-out-user-files", D + " --out {user}", "visor did not write it"),
    ("data-out-earlier", D + " --out {root}/bench", "pass --overwrite"),
    ("data-out-checkpoint", D + " --out {visor} --overwrite", "holds a checkpoint, not"),
    # bench and demo
    ("bench-out-is-file", "bench --out {root}/afile.txt", "is a file"),
    ("bench-out-user-files", "bench --out {user}", "visor did not write it"),
    ("bench-prefill-graph-cpu", "bench --prefill graph --device cpu", "needs a CUDA device"),
    ("bench-device", "bench --device nonsense", "unknown device"),
    ("demo-out-user-files", "demo --out {user}", "visor did not write it"),
    ("demo-out-eval", "demo --out {root}/eval_out", "`visor eval`"),
]


@pytest.mark.parametrize("case, line, message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_command_line(world, monkeypatch, capsys, case, line, message):
    import shlex

    args = [a.format(**world) for a in shlex.split(line)]
    before = snapshot(world["root"])
    assert_one_error(*run_cli(monkeypatch, capsys, args), message)
    assert snapshot(world["root"]) == before  # user files, inputs and earlier outputs untouched


def api_cases(w):
    model = visor.load(w["ckpt"])
    img = w["img"]
    return [
        ("images-none", lambda: model.generate(None, "Hi"), visor.InputError, "images is None"),
        ("images-none-in-batch", lambda: model.generate([img, None], ["a", "b"]), visor.InputError, "images is None"),
        ("path-for-batch", lambda: model.generate(img, ["q1", "q2"]), visor.InputError, "one per prompt"),
        ("prompt-not-text", lambda: model.generate(img, 123), visor.InputError, "prompts must be a string"),
        ("batch-mismatch", lambda: model.generate([img, img], ["q"]), visor.InputError, "1 prompt(s) but 2"),
        (
            "auto-max-new-zero",
            lambda: model.generate(img, "Hi", budget="auto", max_new_tokens=0),
            visor.ConfigError,
            "max_new_tokens must be",
        ),  # fmt: skip
        ("auto-no-sa", lambda: visor.load(w["nosa"]).generate(img, "Hi", budget="auto"), visor.ConfigError, "has none"),
        ("flops-negative", lambda: model.flops(-1, 5), visor.ConfigError, "visual tokens must be"),
        ("flops-crops", lambda: model.flops(5, 5, n_crops=-1), visor.ConfigError, "crops must be"),
        ("flops-function", lambda: visor.flops(model.config, model.schedule, 1, 5, -3), visor.ConfigError, "text"),
        ("load-dtype", lambda: visor.load(w["ckpt"], dtype="float64"), visor.ConfigError, "unknown dtype"),
        ("load-torch-dtype", lambda: visor.load(w["ckpt"], dtype=torch.int8), visor.ConfigError, "unsupported dtype"),
        ("load-device", lambda: visor.load(w["ckpt"], device="gpu0"), visor.ConfigError, "unknown device"),
        ("save-into-user", lambda: model.save(w["user"]), visor.OutputError, "visor did not write it"),
        ("save-over-input", lambda: model.save(w["ckpt"], overwrite=True), visor.OutputError, "is the input"),
        ("data-workers", lambda: make_dataset(w["scratch"] / "x", workers=0), visor.ConfigError, "workers"),
        ("result-into-user", lambda: write_result(w["user"], {}), visor.OutputError, "visor did not write it"),
    ]


API_IDS = [
    "images-none",
    "images-none-in-batch",
    "path-for-batch",
    "prompt-not-text",
    "batch-mismatch",
    "auto-max-new-zero",
    "auto-no-sa",
    "flops-negative",
    "flops-crops",
    "flops-function",
    "load-dtype",
    "load-torch-dtype",
    "load-device",
    "save-into-user",
    "save-over-input",
    "data-workers",
    "result-into-user",
]


@pytest.mark.parametrize("case", API_IDS)
def test_bad_api_call(world, case):
    cases = {c[0]: c[1:] for c in api_cases(world)}
    call, error, message = cases[case]
    before = snapshot(world["root"])
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()
    assert snapshot(world["root"]) == before
