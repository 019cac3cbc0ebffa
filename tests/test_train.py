"""Stage 1 / stage 2 universal training, resume after SIGKILL, torchrun == one process."""

import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import visor
from visor.data import read_records, tokenize
from visor.train import TrainConfig, latest_checkpoint, train


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict:
    return {**load_file(path / "model.safetensors"), **load_file(path / "visor.safetensors")}


def config(checkpoints, dataset, out, **kw):
    base = dict(model=str(checkpoints["llava-onevision"]), data=str(dataset / "train.jsonl"),
                images=str(dataset / "img"), out=str(out), batch_size=4, lr=3e-3, warmup_steps=2, seed=0)  # fmt: skip
    return TrainConfig(**(base | kw))


def test_stage1_trains_only_cross_attention(checkpoints, dataset, tmp_path):
    final = train(config(checkpoints, dataset, tmp_path / "s1", stage=1, steps=4, budgets="0-2"))
    before, after = visor.load(checkpoints["llava-onevision"]), visor.load(final)
    base_before, base_after = before.backbone.hf.state_dict(), after.backbone.hf.state_dict()
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)  # bit-identical base
    ca_before, ca_after = before.lm.visor_state_dict(), after.lm.visor_state_dict()
    assert all(not torch.equal(ca_before[k], ca_after[k]) for k in ca_before if k.endswith("gate"))
    assert not (final / "model.safetensors").exists()  # stage 1 writes an adapter over its unchanged base
    assert after.backbone.weights_path == checkpoints["llava-onevision"]


def test_bfloat16_stage1_reads_the_base_in_bfloat16_and_trains_float32(checkpoints, dataset, tmp_path, monkeypatch):
    """--dtype bfloat16: the starting checkpoint is read in bfloat16 (no float32 copy of the base on
    the way in); the frozen base stays bfloat16, the trained CA weights become float32 masters."""
    import visor.train as t

    loaded = []
    load = t.load
    monkeypatch.setattr(t, "load", lambda *a, **kw: loaded.append((kw["dtype"], load(*a, **kw))) or loaded[-1][1])
    train(config(checkpoints, dataset, tmp_path / "s1", stage=1, steps=2, budgets="0-2", dtype="bfloat16"))
    ((dtype, model),) = loaded
    assert dtype == torch.bfloat16
    assert {p.dtype for p in model.backbone.hf.parameters()} == {torch.bfloat16}
    assert {p.dtype for ca in model.lm.cross.values() for p in ca.parameters()} == {torch.float32}


@pytest.mark.parametrize("stage", [1, 2])
def test_loss_decreases_on_a_tiny_overfit_set(checkpoints, dataset, tmp_path, stage):
    run = tmp_path / f"s{stage}"
    train(config(checkpoints, dataset, run, stage=stage, steps=30, budgets="1", lr=1e-2 if stage == 1 else 3e-3))
    assert (run / "final" / "model.safetensors").exists() == (stage == 2)  # stage 2 changes the base: full weights
    curve = losses(run)
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    # stage 1 moves only the CA modules of a random model: a clear drop; stage 2 fits the set
    assert last < (first - 0.3 if stage == 1 else 0.5 * first), curve


def test_budgets_are_sampled_and_logged(checkpoints, dataset, tmp_path):
    run = tmp_path / "u"
    train(config(checkpoints, dataset, run, stage=1, steps=12, budgets="0,2,full", budget_weights=[1, 1, 2]))
    sampled = [json.loads(line)["budget"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert set(sampled) <= {0, 2, "full"} and len(set(sampled)) > 1
    assert "mean loss per budget" in (run / "train.log").read_text()
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert row["visual_tokens_per_s"] > 0 and row["text_tokens_per_s"] > 0 and "mfu" not in row  # no GPU peak here
    # the step's forward FLOPs (visor.flops, per sample) x 3 for forward + backward, over its time
    from visor.data import RecordIndex, TrainSet
    from visor.train import sample_indices

    model = visor.load(checkpoints["llava-onevision"])
    data = TrainSet(RecordIndex(dataset / "train.jsonl"), dataset / "img", model.backbone)
    cfg = config(checkpoints, dataset, run, stage=1, steps=12, budgets="0,2,full")
    flops = 0
    for i in sample_indices(0, 0, cfg, len(data), 1, 0):
        x = data[i]
        sample = model.backbone.expand(x.ids, model.backbone.image_features(x.images))
        n_visual = sample.visual.shape[0]
        n_text = len(sample.ids) - n_visual
        flops += model.flops(n_visual, n_text, row["budget"], sample.n_crops, grids=sample.grids).prefill
    assert row["model_tflops_per_s"] * 1e12 * row["elapsed_s"] == pytest.approx(3 * flops, rel=1e-6)
    assert (run / "config.yaml").is_file()


REDUCTIONS = {
    "pdrop": ('{"method": "pdrop", "stages": [1, 2], "ratio": 0.5}', False),  # PyramidDrop trains with its drops
    "visionzip": ('{"method": "visionzip", "dominant": 4, "contextual": 1}', True),  # VisionZip: the projector
}


@pytest.mark.parametrize("method", REDUCTIONS)
def test_training_under_a_token_reduction(checkpoints, dataset, tmp_path, method):
    """The base trained as the baseline's paper trains it: the loss falls, the logged FLOPs are those of
    the reduced samples (fewer than without), and --projector-only changes the projector alone."""
    from visor.data import RecordIndex, TrainSet
    from visor.reduce import Reduction
    from visor.train import sample_indices

    spec, projector_only = REDUCTIONS[method]
    run = tmp_path / method
    cfg = config(checkpoints, dataset, run, stage=2, budgets="full", steps=25, reduction=spec,
                 projector_only=projector_only, lr=3e-2 if projector_only else 2e-3)  # fmt: skip
    final = train(cfg)
    curve = losses(run)
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last < (first - 0.2 if projector_only else 0.7 * first), curve  # a projector alone moves a random LM less
    model, reduction = visor.load(checkpoints["llava-onevision"]), Reduction(**json.loads(spec))
    data = TrainSet(RecordIndex(dataset / "train.jsonl"), dataset / "img", model.backbone)
    reduced = full = 0
    for i in sample_indices(0, 0, cfg, len(data), 1, 0):
        x = data[i]
        for r in (reduction, None):
            zip_ = r.visionzip if r else None
            sample = model.backbone.expand(x.ids, model.backbone.image_features(x.images, zip_))
            n_visual = sample.visual.shape[0]
            flops = model.flops(n_visual, len(sample.ids) - n_visual, "full", sample.n_crops, r).prefill
            reduced, full = (reduced + flops, full) if r else (reduced, full + flops)
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert row["model_tflops_per_s"] * 1e12 * row["elapsed_s"] == pytest.approx(3 * reduced, rel=1e-6)
    assert reduced < full
    before, after = model.backbone.hf.state_dict(), visor.load(final).backbone.hf.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    if projector_only:
        assert changed == {k for k in before if "multi_modal_projector" in k}
    else:
        assert any("language_model.layers" in k for k in changed)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(reduction="{pdrop"), "must be a JSON object"),
        (dict(reduction='{"method": "pdrop", "depth": 2}'), "unknown field 'depth'"),
        (dict(reduction='{"method": "pdrop", "stages": 3}'), "stages must be list"),
        (dict(reduction='{"method": "fastv", "layer": "2"}'), "layer must be int"),
        (dict(reduction='["pdrop"]'), "not an object"),
        (dict(reduction='{"method": "fastv"}', budgets="0-2"), "use --stage 2 --budgets full"),
        (dict(reduction='{"method": "fastv"}', stage=1, budgets="full"), "use --stage 2 --budgets full"),
        (dict(projector_only=True, stage=1), "use --stage 2"),
        (dict(reduction='{"method": "pdrop", "stages": [9]}', budgets="full"), "prune points"),
    ],
)
def test_bad_reduction_training_options_are_refused(checkpoints, dataset, tmp_path, kw, message):
    cfg = config(checkpoints, dataset, tmp_path / "x", **({"stage": 2} | kw))
    with pytest.raises(visor.ConfigError, match=message):
        train(cfg)
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_projector_only_needs_a_projector(checkpoints, dataset, tmp_path):
    cfg = config(checkpoints, dataset, tmp_path / "x", stage=2, projector_only=True)
    cfg.model = str(checkpoints["qwen2-vl"])
    with pytest.raises(visor.ConfigError, match="no multi_modal_projector"):
        train(cfg)


def test_bad_records_are_skipped_when_met_and_counted(checkpoints, dataset, tmp_path):
    """Records are read when a step needs them: the unusable ones (bad JSON, no answer, a missing or
    broken image) are skipped and named in train.log; the run stops past --max-bad; a file whose first
    records are all unusable fails before anything is written."""
    shutil.copytree(dataset / "img", tmp_path / "img")
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png at all")
    good = (dataset / "train.jsonl").read_text().splitlines()[:3]
    bad = [
        json.dumps({"image": "missing.png", "question": "q", "answer": "a"}),
        json.dumps({"image": "broken.png", "question": "q", "answer": "a"}),
        json.dumps({"image": "0.png", "question": "q"}),
        "{not json",
        json.dumps({"image": "0.png", "conversations": [{"from": "human", "value": "<image> hi"}]}),
    ]
    (tmp_path / "mixed.jsonl").write_text("\n".join(good + bad) + "\n")
    records, skipped = read_records(tmp_path / "mixed.jsonl", tmp_path / "img")  # eval's reader: all at once
    assert len(records) == 3 and len(skipped) == 5
    assert any("image not found" in s for s in skipped) and any("unreadable image" in s for s in skipped)
    run = tmp_path / "run"
    mixed = dict(data=str(tmp_path / "mixed.jsonl"), images=str(tmp_path / "img"), max_bad=0.9)
    train(config(checkpoints, dataset, run, stage=1, steps=2, **mixed))  # 2 steps x 4: every record met once
    log = (run / "train.log").read_text()
    assert "8 records; of the first 8, 4 unusable" in log  # the start-up probe opens no image
    for reason in ("mixed.jsonl:4: image not found", "mixed.jsonl:5:", "mixed.jsonl:7: invalid JSON", "no assistant"):
        assert reason in log
    assert len(losses(run)) == 2
    with pytest.raises(visor.InputError, match="5 of the 8 records met so far are unusable, over --max-bad 0.5"):
        train(config(checkpoints, dataset, tmp_path / "run3", stage=1, steps=2, **(mixed | {"max_bad": 0.5})))
    (tmp_path / "bad.jsonl").write_text("\n".join(bad[:1] + bad[2:]) + "\n")  # not broken.png: found when opened
    with pytest.raises(visor.InputError, match="no usable record among the first 4"):
        bad_set = dict(data=str(tmp_path / "bad.jsonl"), images=str(tmp_path / "img"))
        train(config(checkpoints, dataset, tmp_path / "run2", stage=1, steps=1, **bad_set))
    assert not (tmp_path / "run2").exists()
    (tmp_path / "bad.jsonl").write_text("\n".join(bad) + "\n")  # broken.png passes the probe, fails to load
    with pytest.raises(visor.InputError, match="no usable record in the training set"):
        train(config(checkpoints, dataset, tmp_path / "run4", stage=1, steps=1, **bad_set))
    assert not (tmp_path / "run4").exists()


def test_a_rank_whose_micro_batch_is_all_unusable_keeps_step_with_the_others(checkpoints, dataset, tmp_path):
    """Two DDP processes, one record each per step, half the records bad: a rank with nothing usable
    still runs its forward and backward (a usable record at weight 0), so the collectives pair up."""
    good = (dataset / "train.jsonl").read_text().splitlines()[:4]
    missing = [json.dumps({"image": f"gone{i}.png", "question": "q", "answer": "a"}) for i in range(4)]
    (tmp_path / "half.jsonl").write_text("\n".join(x for pair in zip(good, missing) for x in pair) + "\n")
    run = tmp_path / "run"
    args = ["--model", checkpoints["llava-onevision"], "--data", tmp_path / "half.jsonl", "--images", dataset / "img"]
    args += ["--out", run, "--stage", 2, "--steps", 4, "--batch-size", 1, "--max-bad", 0.9]
    torchrun("visor.train", args, tmp_path)
    log = (run / "train.log").read_text()
    assert log.count("image not found") >= 1 and len(losses(run)) == 4
    assert all(math.isfinite(x) for x in losses(run))


def test_workers_read_what_one_process_reads(checkpoints, dataset, tmp_path):
    """2 DataLoader workers reading ahead give the losses of reading in the training process, and a
    directory of JSONL shards trains like the one file it was cut from."""
    rows = (dataset / "train.jsonl").read_text().splitlines()
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.jsonl").write_text("\n".join(rows[:7]) + "\n")
    (tmp_path / "shards" / "b.jsonl").write_text("\n".join(rows[7:]) + "\n")
    common = dict(stage=1, steps=3, budgets="0,2")
    train(config(checkpoints, dataset, tmp_path / "w0", **common))
    train(config(checkpoints, dataset, tmp_path / "w2", workers=2, **common))
    shards = dict(data=str(tmp_path / "shards"), images=str(dataset / "img"))
    train(config(checkpoints, dataset, tmp_path / "sh", **common, **shards))
    assert losses(tmp_path / "w0") == losses(tmp_path / "w2") == losses(tmp_path / "sh")


def test_record_index_finds_every_record_without_reading_them(tmp_path):
    from visor.data import RecordIndex

    # an empty line, CRLF, a line of whitespace, an indented record, no final newline
    (tmp_path / "a.jsonl").write_text('{"x": 1}\n\n{"x": 2}\r\n \t\r\n{broken\n {"x": 3}')
    index = RecordIndex(tmp_path / "a.jsonl")
    got = [index.get(i) for i in range(len(index))]
    assert [g[0] for g in got] == ["a.jsonl:1", "a.jsonl:3", "a.jsonl:5", "a.jsonl:6"]
    assert [g[1] for g in got[:2]] + [got[3][1]] == [{"x": 1}, {"x": 2}, {"x": 3}]
    assert got[2][1].startswith("invalid JSON")
    (tmp_path / "b.json").write_text('[{"x": 4}, {"x": 5}]')
    assert RecordIndex(tmp_path / "b.json").get(1) == ("b.json[1]", {"x": 5})
    with pytest.raises(visor.InputError, match="not found"):
        RecordIndex(tmp_path / "none.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(visor.InputError, match="no \\*.json or \\*.jsonl shard"):
        RecordIndex(tmp_path / "empty")


@pytest.mark.parametrize("indent", [None, 2])
def test_llava_json_is_indexed_element_by_element(tmp_path, indent, monkeypatch):
    """An LLaVA JSON list is indexed by each element's byte range, read through a window much smaller
    than the file (so elements straddle its edges), as json.loads reads the whole file."""
    from visor.data import RecordIndex, _element_offsets

    turns = [{"from": "human", "value": 'é ] [ \\" ,{'}, {"value": 12.5}]  # JSON syntax inside strings
    items = [{"image": f"{i}.png", "conversations": turns, "n": i * 10**i} for i in range(40)]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(items, indent=indent, ensure_ascii=False))
    for chunk in (1, 7, 64, 1 << 24):
        start, length, number = _element_offsets(path, chunk)
        raw = path.read_bytes()
        assert [json.loads(raw[a : a + n]) for a, n in zip(start, length)] == json.loads(raw)
        assert list(number) == list(range(40))
    index = RecordIndex(path)
    assert index.get(39) == ("a.json[39]", items[39])
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "0.json").write_text(json.dumps(items[:3]))
    (tmp_path / "shards" / "1.json").write_text(json.dumps(items[3:5]))
    shards = RecordIndex(tmp_path / "shards")
    assert [shards.get(i) for i in range(len(shards))] == [
        ("0.json[0]", items[0]), ("0.json[1]", items[1]), ("0.json[2]", items[2]),
        ("1.json[0]", items[3]), ("1.json[1]", items[4]),
    ]  # fmt: skip
    (tmp_path / "shards" / "2.jsonl").write_text(json.dumps(items[5]))  # JSONL shards: a .json beside them is not one
    assert [RecordIndex(tmp_path / "shards").get(0)] == [("2.jsonl:1", items[5])]
    for cut in ('[{"a": "x y", "b": [1, 2', '[{"a": "x'):  # cut by the window: read on; broken: stop there
        path.write_text(cut + " " * 10_000 + "]")
        with pytest.raises(visor.InputError, match="not valid JSON"):
            _element_offsets(path, 4)
    path.write_text('[{"a": 1}, {"b": ]' + " " * 10_000 + ', {"c": 3}]')
    read = []

    class Counted(io.FileIO):
        def read(self, n=-1):
            read.append(n)
            return super().read(n)

    monkeypatch.setattr(visor.data, "open", lambda name, mode: Counted(name, "r"), raising=False)
    with pytest.raises(visor.InputError, match="byte 17: Expecting value"):
        _element_offsets(path, 64)
    assert read == [64]  # found in the first window, without reading the rest
    monkeypatch.undo()
    for text, why in [
        ('[{"a": 1},]', "byte 10: a ',' before"),
        ('[{"a": 1} {"b": 2}]', "byte 10: expected ','"),
        ('[{"a": 1}] x', "byte 11: data after"),
        ('[{"a": ', "byte 7: Expecting value"),
        ('{"a": 1}', "must hold a JSON list"),
        ("", "must hold a JSON list"),
    ]:
        path.write_text(text)
        with pytest.raises(visor.InputError, match=why):
            _element_offsets(path, 3)
    path.write_text(" [ ]\n")
    assert len(RecordIndex(path)) == 0


def test_llava_json_and_jsonl_tokenize_alike(checkpoints, dataset):
    model = visor.load(checkpoints["llava-onevision"])
    a = read_records(dataset / "train.jsonl", dataset / "img")[0][0]
    b = read_records(dataset / "train.json", dataset / "img")[0][0]
    ids, labels = tokenize(model.backbone, a)
    assert (ids, labels) == tokenize(model.backbone, b)
    learned = model.backbone.tokenizer.decode([i for i, lab in zip(ids, labels) if lab])
    assert learned.startswith(a.answer) and "<|im_end|>" in learned  # the answer and the end of turn


def test_a_training_set_tokenizes_each_conversation_once(checkpoints, dataset, monkeypatch):
    """Templated data repeats its conversations: TrainSet remembers the last MEMO distinct ones' tokens
    (what tokenize gives, handed out as copies), and reads no image of a record whose tower output is kept."""
    from visor.data import RecordIndex, TrainSet

    model = visor.load(checkpoints["llava-onevision"])
    data = TrainSet(RecordIndex(dataset / "train.jsonl"), dataset / "img", model.backbone)
    records = read_records(dataset / "train.jsonl", dataset / "img")[0]
    calls = []
    monkeypatch.setattr(visor.data, "tokenize", lambda *a: calls.append(1) or tokenize(*a))
    distinct = len({(tuple(r.turns), len(r.images)) for r in records})
    assert 1 < distinct < len(records)  # the test data repeats some conversations
    for _ in range(2):
        for i, record in enumerate(records):
            x = data.read(i)
            assert (x.ids, x.labels) == tokenize(model.backbone, record) and all(hasattr(im, "size") for im in x.images)
    assert len(calls) == distinct
    x.ids.append(-1)  # a copy: the remembered tokens are unchanged
    assert data.read(len(records) - 1).ids[-1] != -1
    data.MEMO, data.memo = 2, {}
    for i in range(len(records)):
        data.read(i)
    assert len(data.memo) == 2
    data.kept_towers = {data.read(0).source}
    assert data.read(0).images == records[0].images and hasattr(data.read(1).images[0], "size")  # paths; pictures


def run_cli(args, env=None, **kw):
    cmd = [str(Path(sys.executable).with_name("visor")), "train", *map(str, args)]
    return subprocess.Popen(
        cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw
    )


# Adam divides by sqrt(v): for near-zero gradients, float reordering (two processes' or two micro-batches' sums
# instead of one) moves a weight by a small fraction of one step (lr = 3e-3): up to 1.2e-5 measured between one and
# two processes on an AVX-512 / AMX Xeon, under 1e-5 on another CPU; a wrong gradient moves it by up to ~lr a step.
REORDERED = 1e-4


def cli_args(checkpoints, dataset, out, steps, batch, extra=()):
    return ["--model", checkpoints["llava-onevision"], "--data", dataset / "train.jsonl", "--images", dataset / "img",
            "--out", out, "--stage", 2, "--steps", steps, "--batch-size", batch, "--lr", 3e-3, *extra]  # fmt: skip


def test_resume_after_sigkill_is_exact(checkpoints, dataset, tmp_path):
    n = 3
    straight = tmp_path / "straight"
    assert run_cli(cli_args(checkpoints, dataset, straight, 2 * n, 4)).wait() == 0
    killed = tmp_path / "killed"
    reading = ["--save-every", n, "--grad-accum", 2, "--workers", 2]  # records read ahead by 2 processes
    proc = run_cli(cli_args(checkpoints, dataset, killed, 2 * n, 4, reading), start_new_session=True)
    while not (killed / "checkpoints" / f"step-{n:07d}").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its reading processes, as a job's end kills them all
    proc.wait()
    assert not (killed / "final").exists()
    resumed = run_cli(cli_args(checkpoints, dataset, killed, 2 * n, 4, [*reading, "--resume"]))
    assert resumed.wait() == 0, resumed.stderr.read().decode()
    reference = tmp_path / "reference"  # the same flags, never interrupted
    assert run_cli(cli_args(checkpoints, dataset, reference, 2 * n, 4, ["--grad-accum", 2])).wait() == 0
    assert losses(killed) == losses(reference)
    a, b = weights(killed / "final"), weights(reference / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_torchrun_two_processes_equal_one_with_twice_the_batch(checkpoints, dataset, tmp_path, sharding):
    """Two processes at batch 2 equal one at batch 4; killed (SIGKILL, launcher and every process) while
    writing a checkpoint and resumed, the two-process run ends exactly as if never killed."""
    two = tmp_path / "two"
    flags = ["--fsdp"] if sharding == "fsdp" else []
    torchrun("visor.train", cli_args(checkpoints, dataset, two, 4, 2, flags), tmp_path)
    one = tmp_path / "one"
    assert run_cli(cli_args(checkpoints, dataset, one, 4, 4)).wait() == 0
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)
    a, b = weights(two / "final"), weights(one / "final")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= REORDERED

    killed = tmp_path / "killed"
    (tmp_path / "kill.py").write_text(KILL_MID_SAVE)
    args = cli_args(checkpoints, dataset, killed, 4, 2, [*flags, "--save-every", 1, "--workers", 2])
    torchrun(str(tmp_path / "kill.py"), args, tmp_path, returncode=-signal.SIGKILL)
    assert not (killed / "final").exists() and latest_checkpoint(killed).name == "step-0000001"
    assert list((killed / "checkpoints").glob(".step-0000002.visor-tmp-*"))  # left half-written
    torchrun("visor.train", [*args, "--resume"], tmp_path)
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == [f"step-000000{i}" for i in (1, 2, 3)]
    assert losses(killed) == losses(two)
    a, b = weights(killed / "final"), weights(two / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


GATHER_COUNTER = """
import sys
import visor.train as t

calls = []
gather = t.full_states
t.full_states = lambda trainee, optimizer, fsdp: calls.append(fsdp) or gather(trainee, optimizer, fsdp)
sys.argv = ["visor.train", *sys.argv[1:]]
t.main()
print(f"full gathers: {len(calls)}")
"""


KILL_MID_SAVE = """
import os, signal, sys
from pathlib import Path
import visor.train as t

pids = Path("pids")
pids.mkdir(exist_ok=True)
(pids / os.environ["RANK"]).write_text(str(os.getpid()))
saves = []
rng_state = t.rng_state
def die_in_second_save():  # rank 0, writing the second checkpoint (its model or shards written)
    saves.append(1)
    if len(saves) == 2:
        os.kill(os.getppid(), signal.SIGKILL)  # torchrun, then every worker (this one last)
        for rank in sorted(pids.iterdir(), reverse=True):
            os.kill(int(rank.read_text()), signal.SIGKILL)
    return rng_state()
t.rng_state = die_in_second_save
sys.argv = ["visor.train", *sys.argv[1:]]
t.main()
"""


def torchrun(script_or_module, args, tmp_path, n=2, returncode=0):
    runner = str(Path(sys.executable).with_name("torchrun"))
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = ["-m", script_or_module] if script_or_module.startswith("visor") else [script_or_module]
    cmd = [runner, "--nproc_per_node", str(n), "--master_port", str(port), *target, *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == returncode, done.stderr[-3000:]
    return done.stdout


def test_fsdp_checkpoints_are_sharded_and_resume_on_another_process_count(checkpoints, dataset, tmp_path):
    """An FSDP run's checkpoint is every rank's shards (torch.distributed.checkpoint), written with no
    gather (only the final model is gathered); resumed by one process at the same global batch, the
    next steps' losses are those of the two-process run."""
    (tmp_path / "count.py").write_text(GATHER_COUNTER)
    two = tmp_path / "two"
    out = torchrun(
        str(tmp_path / "count.py"), cli_args(checkpoints, dataset, two, 4, 2, ["--fsdp", "--save-every", 2]), tmp_path
    )
    assert out.count("full gathers: 1") == 2  # each rank: the final model only
    step = two / "checkpoints" / "step-0000002"
    assert sorted(p.name for p in (step / "shards").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (step / "model").exists() and (step / "state.pt").is_file()
    one = tmp_path / "one"
    shutil.copytree(two, one)
    shutil.rmtree(one / "final")
    done = run_cli(cli_args(checkpoints, dataset, one, 4, 4, ["--fsdp", "--save-every", 2, "--resume"]))
    assert done.wait() == 0, done.stderr.read().decode()
    assert "resumed from" in (one / "train.log").read_text()
    assert losses(one)[:2] == losses(two)[:2] and losses(one)[2:] == pytest.approx(losses(two)[2:], abs=1e-5)
    a, b = weights(one / "final"), weights(two / "final")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= REORDERED
    wrong = run_cli(cli_args(checkpoints, dataset, one, 4, 2, ["--fsdp", "--save-every", 2, "--resume"]))
    assert wrong.wait() == 2 and "global batch of 4" in wrong.stderr.read().decode()


def test_bfloat16_training_with_float32_master_weights(checkpoints, dataset, tmp_path):
    """--dtype bfloat16: one process computes under autocast, two FSDP processes gather bfloat16 shards
    (their mixed-precision policy) beside the frozen tower's bfloat16 ones; the losses follow float32's,
    the optimizer state stays float32, and final/ is written in bfloat16."""
    from torch.distributed.checkpoint import FileSystemReader

    common = ["--budgets", "0,2", "--save-every", 2, "--freeze-vision"]  # a frozen bfloat16 tower in FSDP's root
    assert run_cli(cli_args(checkpoints, dataset, tmp_path / "fp32", 4, 4, common)).wait() == 0
    bf16 = run_cli(cli_args(checkpoints, dataset, tmp_path / "bf16", 4, 4, [*common, "--dtype", "bfloat16"]))
    assert bf16.wait() == 0, bf16.stderr.read().decode()
    sharded = tmp_path / "fsdp"
    torchrun(
        "visor.train",
        cli_args(checkpoints, dataset, sharded, 4, 2, [*common, "--dtype", "bfloat16", "--fsdp"]),
        tmp_path,
    )
    reference = losses(tmp_path / "fp32")
    for run in ("bf16", "fsdp"):
        got = losses(tmp_path / run)
        assert got != reference and got == pytest.approx(reference, rel=0.05), run
        assert {t.dtype for t in weights(tmp_path / run / "final").values()} == {torch.bfloat16}
    assert {t.dtype for t in weights(tmp_path / "fp32" / "final").values()} == {torch.float32}
    meta = FileSystemReader(str(sharded / "checkpoints" / "step-0000002" / "shards")).read_metadata()
    moments = [m for k, m in meta.state_dict_metadata.items() if k.endswith(".exp_avg")]
    assert moments and {m.properties.dtype for m in moments} == {torch.float32}


def crops_through_the_tower(cfg: TrainConfig, kept_towers=None, reads: list | None = None, **kw) -> int:
    """Train (``kw``: to ``train``); the number of crops the vision tower encoded (a hook on the model the
    run loads). ``reads``: each record whose images the run read is appended to it."""
    from visor.data import Record

    model, seen, load_images = visor.load(cfg.model), [], Record.load_images
    hook = model.backbone.hf.model.vision_tower.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("visor.train.load", lambda *a, **k: model)
        mp.setattr(
            Record, "load_images", lambda self: (reads if reads is not None else []).append(self) or load_images(self)
        )
        train(cfg, kept_towers, **kw)
    hook.remove()
    return sum(seen)


ZIP = '{"method": "visionzip", "dominant": 2, "contextual": 1}'


@pytest.mark.parametrize("arch, kw", [("llava-onevision", dict(stage=2, freeze_vision=True)),
                                      ("llava", dict(stage=1, budgets="0-1")),
                                      ("llava-onevision", dict(stage=2, budgets="full", projector_only=True,
                                                               reduction=ZIP))])  # fmt: skip
def test_kept_tower_outputs_train_as_the_tower_does(checkpoints, dataset, tmp_path, arch, kw):
    """--cache-vision: each record's tower output (VisionZip: with its scores and keys) is computed once
    (16 records, 12 steps of 4: every record met three times) and the run trains exactly as one that
    runs the tower every step; a later run in the process, given the same dict, meets them kept."""
    runs, shared, reads = {}, {}, {False: [], True: [], "again": []}
    for cached in (False, True):
        out = tmp_path / f"{arch}-{cached}"
        cfg = config(checkpoints, dataset, out, model=str(checkpoints[arch]), steps=12, cache_vision=cached, **kw)
        runs[cached] = out, crops_through_the_tower(cfg, shared, reads[cached])
    later = lambda name: config(checkpoints, dataset, tmp_path / name, model=str(checkpoints[arch]), steps=4,  # noqa: E731
                                cache_vision=True, **kw)  # fmt: skip
    assert crops_through_the_tower(later("again"), shared, reads["again"]) == 0  # a later run meets them kept
    # images read: every record met (48) or each record once (16); and the stand-in batch's record, at the start
    assert [len(reads[k]) for k in reads] == [48 + 1, 16 + 1, 1]
    os.utime(dataset / "train.jsonl")  # the data file changed (its time): encoded anew
    assert crops_through_the_tower(later("changed"), shared) > 0
    (plain, crops), (kept, crops_kept) = runs[False], runs[True]
    assert crops_kept == crops / 3  # each record's crops once
    assert losses(kept) == losses(plain)
    for name in ("model.safetensors", "visor.safetensors") if kw["stage"] == 2 else ("visor.safetensors",):
        a, b = load_file(kept / "final" / name), load_file(plain / "final" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "kept the vision tower's output of 16 records" in (kept / "train.log").read_text()


@pytest.mark.parametrize("arch", ["llava-onevision", "llava"])
def test_a_plain_run_keeps_visionzip_scores_for_a_later_visionzip_run(checkpoints, dataset, tmp_path, arch):
    """keep_visionzip_scores (the demo's base): a plain run keeps VisionZip's scores and keys with each
    tower output where one output serves both (LLaVA-OneVision here: its last layer, every token); a later
    VisionZip run in the process then runs no tower, reads no image but the stand-in batch's, and trains
    exactly as one that runs its own. Kept without them, the VisionZip run encodes every record again.
    LLaVA's plain tokens (one layer before the last, no CLS) are not VisionZip's: its VisionZip run encodes
    its own either way."""
    model = str(checkpoints[arch])
    plain = dict(model=model, steps=12, stage=2, freeze_vision=True, cache_vision=True)
    zipped = dict(model=model, steps=12, stage=2, budgets="full", projector_only=True, reduction=ZIP, cache_vision=True)
    run = lambda name, kw, shared=None, reads=None, **more: crops_through_the_tower(  # noqa: E731
        config(checkpoints, dataset, tmp_path / name, **kw), shared, reads, **more
    )
    alone = run("alone", zipped)  # VisionZip encoding its own
    met, reads, scored = {}, {}, {}
    for keep in (True, False):
        shared, reads[keep] = {}, []
        assert run(f"plain-{keep}", plain, shared, keep_visionzip_scores=keep) == alone > 0
        scored[keep] = {t.scores is not None for kept in shared.values() for t in kept.values() if t is not None}
        assert run(f"again-{keep}", plain, shared) == 0  # scored or not, they serve a later plain run
        met[keep] = run(f"zip-{keep}", zipped, shared, reads[keep])
    for name in ("plain", "again"):  # a plain run trains alike on scored outputs
        assert losses(tmp_path / f"{name}-True") == losses(tmp_path / f"{name}-False")
    if arch == "llava":
        assert met == {True: alone, False: alone} and scored == {True: {False}, False: {False}}
        return
    assert scored == {True: {True}, False: {False}}
    assert met == {True: 0, False: alone}
    assert [len(reads[k]) for k in (True, False)] == [1, 16 + 1]  # and the stand-in batch's record, at the start
    for name in ("zip-True", "zip-False"):
        assert losses(tmp_path / name) == losses(tmp_path / "alone")
        a, b = (load_file(tmp_path / r / "final" / "model.safetensors") for r in (name, "alone"))
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "arch, kw, message",
    [
        ("llava-onevision", dict(stage=2), "the tower must stay fixed"),
        ("qwen2-vl", dict(stage=1), "cannot be kept apart from its projector"),
        ("llava-onevision", dict(stage=1, fsdp=True), "use it without --fsdp"),
    ],
)  # fmt: skip
def test_cache_vision_is_refused_where_it_cannot_hold(checkpoints, dataset, tmp_path, arch, kw, message):
    with pytest.raises(visor.ConfigError, match=message):
        train(config(checkpoints, dataset, tmp_path / "x", model=str(checkpoints[arch]), cache_vision=True, **kw))
    assert not (tmp_path / "x").exists()


def test_accumulation_and_activation_checkpointing_change_nothing(checkpoints, dataset, tmp_path):
    runs = {
        "plain": dict(batch_size=4),
        "accum": dict(batch_size=2, grad_accum=2),
        "ckpt": dict(batch_size=4, activation_checkpointing=True),
    }
    for name, kw in runs.items():
        train(config(checkpoints, dataset, tmp_path / name, stage=2, steps=3, **kw))
    # accumulation sums two halves (REORDERED); recomputation is exact
    for name, tol in (("accum", REORDERED), ("ckpt", 1e-6)):
        assert losses(tmp_path / name) == pytest.approx(losses(tmp_path / "plain"), abs=1e-5)
        a, b = weights(tmp_path / name / "final"), weights(tmp_path / "plain" / "final")
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= tol, name


@pytest.mark.parametrize("arch", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "internvl"])
def test_stage1_stage2_and_policy_on_other_families(checkpoints, dataset, tmp_path, arch):
    """Qwen-VL (M-RoPE, dynamic resolution) and InternVL (tiles, pixel shuffle) through the whole recipe:
    stage 1 lowers the loss with the base unchanged, stage 2 continues from it, the policy trains on
    stage 2 and routes `auto`."""
    from visor.policy import PolicyTrainConfig, train_policy

    model = str(checkpoints[arch])
    s1 = train(config(checkpoints, dataset, tmp_path / "s1", model=model, stage=1, steps=12, lr=1e-2, budgets="0-2"))
    curve = losses(tmp_path / "s1")
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3, curve
    assert not (s1 / "model.safetensors").exists()  # an adapter over the unchanged base
    s2 = train(config(checkpoints, dataset, tmp_path / "s2", model=str(s1), stage=2, steps=3, budgets="0-2"))
    assert all(math.isfinite(x) for x in losses(tmp_path / "s2"))
    result = train_policy(s2, dataset / "train.jsonl", dataset / "img", tmp_path / "policy", PolicyTrainConfig(width=8))
    assert {r["budget"] for r in result["rows"]} >= {0, 1, 2, "auto"}
    routed = visor.load(tmp_path / "policy" / "final")
    g = routed.generate(dataset / "img" / "0.png", "Which colour dominates?", budget="auto", max_new_tokens=3)
    assert g.budget in (0, 1, 2) and g.token_ids
