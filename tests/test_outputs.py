"""Outputs survive: --overwrite replaces only our own output, and a SIGKILL or a full disk at any
moment of a write leaves the previous good output intact (visor.outputs).

The kills are real: the command runs in a subprocess whose audit hook sends it SIGKILL at a chosen
moment (the n-th time it opens, renames or deletes a path of a given kind), so each test stops the
writer at exactly the point it names, not somewhere near it by timing."""

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import visor
from visor.backbone import load_image
from visor.cli import main
from visor.outputs import MARKER, atomic_write, read_marker, write_dir
from visor.train import TrainConfig, train

KILLER = r"""
import os, signal, sys
event, needle, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
me, seen = os.getpid(), [0]
def hook(name, args):
    if name == event and os.getpid() == me and any(needle in str(a) for a in args):
        seen[0] += 1
        if seen[0] == nth:
            os.kill(me, signal.SIGKILL)
sys.addaudithook(hook)
sys.argv = ["visor", *sys.argv[4:]]
from visor.cli import main
main()
"""
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def cli(*args) -> int:
    """`visor ARGS` in this process (the steps no test interrupts); its exit code."""
    argv = sys.argv
    sys.argv = ["visor", *map(str, args)]
    try:
        main()
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = argv
    return 0


def on_a_full_disk(max_bytes: int, *args) -> subprocess.CompletedProcess:
    """`visor ARGS` in a process that can't write files past max_bytes: writes fail as on a full
    disk (EFBIG where a disk says ENOSPC)."""

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    cmd = [sys.executable, "-m", "visor.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, preexec_fn=small_files)


def killed_at(event: str, needle: str, nth: int, *args) -> None:
    """Run `visor ARGS` and SIGKILL it at the nth `event` (an audit event) whose arguments hold `needle`."""
    cmd = [sys.executable, "-c", KILLER, event, needle, str(nth), *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stderr[-3000:])


def tree(path: Path) -> dict:
    """Relative path -> sha256 of every file under path."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(path).rglob("*"))
        if p.is_file()
    }


def scratch(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".visor-tmp-" in p.name or ".visor-old-" in p.name]


@pytest.fixture
def project(tmp_path, checkpoints):
    """A user's project: their files, a base model, and a first VISOR checkpoint made by convert."""
    (tmp_path / "thesis.tex").write_text("years of work")
    base = tmp_path / "base"
    shutil.copytree(checkpoints["llava-onevision"], base)
    first = tmp_path / "v1"
    assert cli("convert", "--model", base, "--out", first, "--schedule", "sa,sa,ca,ca,text,text") == 0
    return tmp_path, base, first


# ---- convert ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event, needle, nth, replaced",
    [
        ("open", ".v1.visor-tmp-", 4, False),  # while the new checkpoint is being written beside v1
        ("ctypes.dlsym", "renameat2", 1, False),  # complete, just before the swap
        ("shutil.rmtree", ".v1.visor-tmp-", 2, True),  # swapped in, the previous one not yet deleted
    ],
)
def test_convert_killed_mid_write_keeps_a_whole_checkpoint(project, event, needle, nth, replaced):
    root, base, first = project
    reference = root / "reference"  # what the interrupted command writes, written without interruption
    assert cli("convert", "--model", base, "--out", reference) == 0
    before, user, model = tree(first), tree(root / "base"), (root / "thesis.tex").read_text()
    killed_at(event, needle, nth, "convert", "--model", base, "--out", first, "--overwrite")
    assert tree(first) == (tree(reference) if replaced else before)  # never a mix, never half a file
    assert tree(root / "base") == user and (root / "thesis.tex").read_text() == model
    visor.load(first)  # loads
    assert cli("convert", "--model", base, "--out", first, "--overwrite") == 0  # and the next run tidies up
    assert tree(first) == tree(reference) and scratch(root) == []


def test_convert_on_a_full_disk_keeps_the_previous_checkpoint(project):
    root, base, first = project
    before = tree(first)
    done = on_a_full_disk(50_000, "convert", "--model", base, "--out", first, "--overwrite")
    assert done.returncode == 2 and done.stderr.startswith("error: cannot write")
    assert "the disk is full; the previous content is unchanged" in done.stderr and "Traceback" not in done.stderr
    assert tree(first) == before and scratch(root) == []


def test_swap_cut_between_its_two_renames_is_put_back(project):
    """Where no atomic exchange exists, a swap is two renames; a kill between them leaves the
    previous output at .NAME.visor-old-PID, and the next command writing there puts it back first."""
    root, base, first = project
    before = tree(first)
    stale = root / ".v1.visor-old-999999999"  # a pid that can't be alive
    first.rename(stale)
    with pytest.raises(visor.OutputError, match="pass --overwrite"):
        visor.convert(base, first)
    assert tree(first) == before and not stale.exists()


def test_overwrite_replaces_only_what_visor_wrote(project):
    root, base, first = project
    with pytest.raises(visor.OutputError, match="holds a checkpoint written by visor; pass --overwrite"):
        visor.convert(base, first)
    (first / "my-notes.txt").write_text("mine")
    with pytest.raises(visor.OutputError, match="my-notes.txt"):
        visor.convert(base, first, overwrite=True)
    (first / "my-notes.txt").unlink()
    visor.convert(base, first, overwrite=True)
    assert read_marker(first)["command"] == "checkpoint" and visor.load(first).schedule.roles[0] == "sa"


def test_leftovers_are_removed_only_when_they_are_ours(tmp_path):
    ours = tmp_path / ".out.visor-tmp-999999999"
    ours.mkdir()
    (ours / MARKER).write_text(json.dumps({"command": "checkpoint", "entries": []}))
    theirs = tmp_path / ".out.visor-tmp-888888888"  # the same kind of name, but no marker: not ours
    theirs.mkdir()
    alive = tmp_path / f".out.visor-tmp-{os.getppid()}"  # a running process's: not stale
    alive.mkdir()
    (alive / MARKER).write_text(json.dumps({"command": "checkpoint", "entries": []}))
    write_dir(tmp_path / "out", "checkpoint", lambda tmp: (tmp / "a.txt").write_text("a"))
    assert not ours.exists() and theirs.exists() and alive.exists()
    assert (tmp_path / "out" / "a.txt").read_text() == "a"


def test_atomic_write_leaves_no_temporary_behind_a_failure(tmp_path):
    target = tmp_path / "report.md"
    atomic_write(target, "good")

    def fails(path):
        path.write_text("half")
        raise ValueError("the writer broke")

    with pytest.raises(ValueError):
        atomic_write(target, fails)
    assert target.read_text() == "good" and [p.name for p in tmp_path.iterdir()] == ["report.md"]


# ---- data make ----------------------------------------------------------------------------------------

DATA = ["data", "make", "--train", 6, "--val", 2, "--test", 4, "--image-size", 64, "--workers", 1]


@pytest.mark.parametrize(
    "event, needle, nth",
    [("open", "train.jsonl", 1), ("ctypes.dlsym", "renameat2", 1)],  # mid-write of the new set; before the swap
)
def test_data_make_killed_mid_write_keeps_the_previous_set(tmp_path, event, needle, nth):
    out = tmp_path / "data"
    assert cli(*DATA, "--out", out) == 0
    before = tree(out)
    killed_at(event, needle, nth, *DATA, "--seed", 1, "--out", out, "--overwrite")
    assert tree(out) == before
    assert cli(*DATA, "--seed", 1, "--out", out, "--overwrite") == 0
    assert tree(out) != before and json.loads((out / "card.json").read_text())["seed"] == 1
    assert scratch(tmp_path) == []


def test_data_make_killed_while_rendering_keeps_the_previous_set(tmp_path):
    """The report's case: a re-run over a good set, killed a moment after it began rendering."""
    out = tmp_path / "data"
    assert cli(*DATA, "--out", out) == 0
    before = tree(out)
    cmd = [sys.executable, "-m", "visor.cli", *map(str, DATA), "--train", "400", "--out", str(out), "--overwrite"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".data.visor-tmp-*/images/train/*.png")):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the command and its rendering workers
    proc.wait()
    assert tree(out) == before


# ---- eval ---------------------------------------------------------------------------------------------


def eval_args(checkpoints, dataset, out, *extra):
    return ["eval", "--model", checkpoints["llava"], "--data", dataset / "train.jsonl", "--images", dataset / "img",
            "--limit", 3, "--max-new-tokens", 2, "--out", out, *extra]  # fmt: skip


def test_eval_killed_while_writing_its_result_keeps_the_previous_one(tmp_path, checkpoints, dataset):
    out = tmp_path / "eval"
    assert cli(*eval_args(checkpoints, dataset, out)) == 0
    before = tree(out)
    killed_at(
        "open", ".result.json.visor-tmp-", 1, *eval_args(checkpoints, dataset, out, "--overwrite", "--method", "base")
    )
    assert tree(out) == before and json.loads((out / "result.json").read_text())["method"] == "visor"
    assert cli(*eval_args(checkpoints, dataset, out, "--overwrite", "--method", "base")) == 0
    assert json.loads((out / "result.json").read_text())["method"] == "base"
    assert [p.name for p in out.iterdir() if ".visor-tmp-" in p.name] == []  # the killed run's temporary is gone


def test_eval_on_a_full_disk_keeps_the_previous_result(tmp_path, checkpoints, dataset):
    out = tmp_path / "eval"
    assert cli(*eval_args(checkpoints, dataset, out)) == 0
    before = tree(out)
    done = on_a_full_disk(1_000, *eval_args(checkpoints, dataset, out, "--overwrite"))
    assert done.returncode == 2 and "error: cannot write" in done.stderr and "the disk is full" in done.stderr
    assert tree(out) == before and [p.name for p in out.iterdir() if ".visor-tmp-" in p.name] == []


def test_eval_says_how_many_records_it_left_out(tmp_path, checkpoints, dataset, capsys):
    rows = (dataset / "train.jsonl").read_text().splitlines()[:2]
    rows += [json.dumps({"image": "0.png", "question": "no answer"}), json.dumps({"image": "gone.png", "question": "q",
             "answer": "a"})]  # fmt: skip
    (tmp_path / "mixed.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "eval"
    assert cli("eval", "--model", checkpoints["llava"], "--data", tmp_path / "mixed.jsonl", "--images",
               dataset / "img", "--max-new-tokens", 2, "--out", out) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "warning: 2 unusable record(s) left out (first: mixed.jsonl:3: needs 'conversations'" in err
    result = json.loads((out / "result.json").read_text())
    assert result["n_skipped"] == 2 and result["summary"]["overall"]["n"] == 2
    assert "2 unusable record(s) left out" in (out / "result.md").read_text()


# ---- train --------------------------------------------------------------------------------------------


def train_args(checkpoints, dataset, out, *extra):
    return ["train", "--model", checkpoints["llava-onevision"], "--data", dataset / "train.jsonl", "--images",
            dataset / "img", "--out", out, "--stage", 2, "--steps", 6, "--batch-size", 2, "--lr", 3e-3,
            "--save-every", 2, *extra]  # fmt: skip


def steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_killed_while_checkpointing_resumes_as_one_run(tmp_path, checkpoints, dataset):
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert cli(*train_args(checkpoints, dataset, reference)) == 0
    killed_at("os.rename", ".step-0000004.visor-tmp-", 1, *train_args(checkpoints, dataset, run))  # step 4's, complete
    assert [p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-0000002"]
    assert not (run / "final").exists()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a kill can also cut the last log line short
    with pytest.raises(visor.OutputError, match="pass --resume to continue it or --overwrite"):
        train(TrainConfig(model=str(checkpoints["llava-onevision"]), data=str(dataset / "train.jsonl"), out=str(run)))
    assert cli(*train_args(checkpoints, dataset, run, "--resume")) == 0
    assert steps(run) == [1, 2, 3, 4, 5, 6]  # one run: nothing twice, nothing of the killed tail
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    a, b = load_file(run / "final" / "visor.safetensors"), load_file(reference / "final" / "visor.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "resumed from" in (run / "train.log").read_text()
    final = tree(run / "final")
    assert cli(*train_args(checkpoints, dataset, run, "--resume")) == 0  # complete: nothing to do
    assert tree(run / "final") == final and steps(run) == [1, 2, 3, 4, 5, 6]


def test_train_overwrite_keeps_the_earlier_run_until_the_new_one_ends(tmp_path, checkpoints, dataset):
    run = tmp_path / "run"
    assert cli(*train_args(checkpoints, dataset, run)) == 0
    final = tree(run / "final")
    killed_at(
        "os.rename", ".step-0000002.visor-tmp-", 1, *train_args(checkpoints, dataset, run, "--overwrite", "--seed", 1)
    )
    kept = [p for p in run.iterdir() if p.name.startswith(".visor-old-")]
    assert len(kept) == 1 and tree(kept[0] / "final") == final  # the earlier run, set aside, whole
    assert cli(*train_args(checkpoints, dataset, run, "--resume", "--seed", 1)) == 0  # the new run, from its start
    assert steps(run) == [1, 2, 3, 4, 5, 6] and not kept[0].exists()
    assert read_marker(run)["command"] == "train"


# ---- images -------------------------------------------------------------------------------------------


def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    rgb = np.asarray(load_image(tmp_path / "deep.png")).astype(float)
    expected = np.rint(ramp / 257.0)
    assert rgb.shape == (64, 64, 3) and np.abs(rgb[..., 0] - expected).max() <= 1
    assert 120 < rgb.mean() < 136  # a ramp: mid-grey on average, not 99% white


# ---- names and paths a user might have ----------------------------------------------------------------


def test_a_users_hidden_files_are_content_not_our_temporaries(tmp_path):
    """Names that look like ours but are not (no pid, no marker, another tag) count as the user's."""
    for name in [".old-runs", ".notes.old-2023", ".draft.tmp-99999", ".x.visor-old-abc"]:
        folder = tmp_path / name.strip(".")
        folder.mkdir()
        (folder / name).write_text("mine")
        with pytest.raises(visor.OutputError, match="visor did not write it"):
            write_dir(folder, "data make", lambda tmp: (tmp / "a.txt").write_text("a"))
        assert (folder / name).read_text() == "mine"


def test_out_as_a_link_or_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(visor.OutputError, match="is a symbolic link"):
        write_dir(tmp_path / "link", "data make", lambda tmp: (tmp / "a.txt").write_text("a"))
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    write_dir(".", "data make", lambda tmp: (tmp / "a.txt").write_text("a"))  # an empty current directory
    assert (tmp_path / "here" / "a.txt").read_text() == "a" and scratch(tmp_path) == []


def test_image_paths_may_not_leave_the_current_directory_either(tmp_path, monkeypatch):
    (tmp_path / "inside").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    (tmp_path / "inside" / "d.jsonl").write_text(
        json.dumps({"image": "../outside.png", "question": "q", "answer": "a"})
    )
    monkeypatch.chdir(tmp_path / "inside")
    from visor.data import read_records

    with pytest.raises(visor.InputError, match="lies outside the images directory"):
        read_records("d.jsonl", ".")


def test_overwrite_that_fails_its_checks_leaves_the_earlier_run_in_place(tmp_path, checkpoints, dataset, monkeypatch):
    run = tmp_path / "run"
    assert cli(*train_args(checkpoints, dataset, run, "--steps", 1, "--save-every", 0)) == 0
    before = tree(run)
    assert cli(*train_args(checkpoints, dataset, run, "--overwrite", "--budgets", "0-9")) == 2  # no budget 9
    assert tree(run) == before and [p.name for p in run.iterdir() if p.name.startswith(".visor-old")] == []
    monkeypatch.chdir(tmp_path)  # the same run, its paths spelt another way
    args = train_args(checkpoints, dataset, "./run", "--steps", 1, "--save-every", 0, "--resume")
    assert cli(*args) == 0 and tree(run) == before  # complete already
