"""The lmms-eval model's request handling (visor.lmms.Runner), without lmms-eval installed: the
requests lmms-eval would send (chat messages with PIL images, its generation settings) against the
tiny model, checked against the model's own generate. `make test-lmms` runs lmms-eval itself."""

import json

import pytest
import yaml
from PIL import Image

import visor
from visor.lmms import Request, Runner, cut, split_messages, write_tasks
from visor.synth import make_dataset


def chat(text, *images):
    content = [{"type": "image", "url": im} for im in images] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def pictures(images):
    return [Image.open(p).convert("RGB") for p in images]


@pytest.fixture(scope="module")
def runner(checkpoints, tmp_path_factory):
    flops = tmp_path_factory.mktemp("flops") / "flops.json"
    return Runner(str(checkpoints["llava-onevision"]), budget="1", batch_size="3", device="cpu", flops_file=str(flops))


def test_batched_answers_equal_one_at_a_time(runner, checkpoints, pictures):
    requests = [
        Request(chat("What is shown?", pictures[0]), {"max_new_tokens": 6}, "t", 0),
        Request(chat("Compare them.", pictures[1], pictures[2]), {"max_new_tokens": 6}, "t", 1),  # two images
        Request(chat("Colour?", pictures[3]), {"max_new_tokens": 4, "temperature": 0}, "u", 0),
        Request(chat("And now?", pictures[1]), {"max_new_tokens": 6}, "t", 2),
    ]
    answers = runner.generate(requests)
    model = visor.load(checkpoints["llava-onevision"], device="cpu")
    for r, a in zip(requests, answers):
        prompt, images = split_messages(r.messages)
        alone = model.generate(images, prompt, budget=1, max_new_tokens=r.gen_kwargs["max_new_tokens"])
        assert a.text == alone.text and a.n_output == len(alone.token_ids)
        assert a.n_input == alone.n_visual + alone.n_text
    report = json.loads(runner.flops_file.read_text())
    assert report["budget"] == 1 and report["tasks"]["t"]["n"] == 3 and report["tasks"]["u"]["n"] == 1
    two_images = next(s for s in report["samples"] if s["task"] == "t" and s["doc_id"] == 1)
    assert (
        two_images["lm_prefill"] == model.flops(*split_counts(model, requests[1]), budget=1).lm_prefill
    )  # each sample's own FLOPs, multi-image included


def split_counts(model, request):
    prompt, images = split_messages(request.messages)
    sample = model.encode([prompt], [images])[0]
    return sample.visual.shape[0], len(sample.ids) - sample.visual.shape[0]


def test_stop_strings_and_settings():
    assert cut("a cat. The end", ["."]) == "a cat"
    assert cut("first\n\nsecond", ["\n\n", "zzz"]) == "first" and cut("plain", []) == "plain"
    prompt, images = split_messages([{"role": "system", "content": "Be brief."}, *chat("Q1", "im1", "im2")])
    assert prompt == "Be brief.\nQ1" and images == ["im1", "im2"]  # the system text first; the images in order
    with pytest.raises(visor.ConfigError, match="'assistant' turn"):  # a few-shot chat does not fit one turn
        split_messages([*chat("Q1"), {"role": "assistant", "content": "A1"}, *chat("Q2")])


def test_settings_from_lmms_eval_and_bad_input(runner, pictures, tmp_path):
    stop = Request(lambda: chat("What is shown?", pictures[0]), {"max_new_tokens": 8, "until": "3"}, "t", 0)
    free = Request(chat("What is shown?", pictures[0]), {"max_new_tokens": 8}, "t", 0)
    stopped, full = runner.generate([stop, free])
    assert "3" not in stopped.text and full.text.startswith(stopped.text)
    with pytest.raises(visor.ConfigError, match="gives a video"):
        runner.generate([Request([{"role": "user", "content": [{"type": "video", "url": "v.mp4"}]}])])
    (tmp_path / "notes.json").write_text("{}")
    with pytest.raises(visor.OutputError, match="visor did not write it"):
        Runner(str(runner.model.backbone.path), flops_file=str(tmp_path / "notes.json"))
    with pytest.raises(visor.ConfigError, match="unknown method"):
        Runner(str(runner.model.backbone.path), method="prune")
    with pytest.raises(visor.ConfigError, match="whole number"):
        Runner(str(runner.model.backbone.path), batch_size="auto")
    with pytest.raises(visor.OutputError, match="not a directory visor can write to"):
        Runner(str(runner.model.backbone.path), flops_file=str(tmp_path / "missing" / "f.json"))


def test_a_baseline_through_the_runner(checkpoints, pictures, tmp_path):
    fastv = Runner(
        str(checkpoints["llava-onevision"]), method="fastv", layer=1, keep=0.25, flops_file=str(tmp_path / "f")
    )
    assert fastv.setting.budget == "full" and fastv.setting.reduction.keep == 0.25
    (answer,) = fastv.generate([Request(chat("What is shown?", pictures[1]), {"max_new_tokens": 3}, "t", 0)])
    report = json.loads((tmp_path / "f").read_text())
    assert report["method"] == "fastv" and report["samples"][0]["lm_prefill"] > 0 and answer.n_output <= 3


def test_task_files_for_lmms_eval(tmp_path):
    make_dataset(tmp_path / "data", 0, {"train": 0, "val": 0, "test": 3}, ["quadrant", "marked_digit"], 64, 1,
                 progress=False)  # fmt: skip
    names = write_tasks(tmp_path / "data", tmp_path / "tasks")
    assert names == ["visor_hard", "visor_easy", "visor_all"]  # no reasoning record: no visor_reasoning task
    loader = type("Loader", (yaml.SafeLoader,), {})
    loader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))
    config = yaml.load((tmp_path / "tasks" / "visor_hard.yaml").read_text(), Loader=loader)
    docs = [json.loads(line) for line in open(config["dataset_kwargs"]["data_files"]["test"])]
    assert config["task"] == "visor_hard" and len(docs) == 3 and {d["family"] for d in docs} == {"hard"}
    assert config["doc_to_visual"] == ("function", "visor_task_utils.doc_to_visual")
    assert all((tmp_path / "tasks" / d["image"]).is_file() for d in docs)  # images travel with the tasks
    import importlib.util

    spec = importlib.util.spec_from_file_location("utils", tmp_path / "tasks" / "visor_task_utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    assert utils.doc_to_visual(docs[0])[0].size == (64, 64) and utils.doc_to_text(docs[0]) == docs[0]["question"]
    assert utils.process_results(docs[0], [docs[0]["answer"].upper()]) == {"exact_match": 1.0, "anls": 1.0}
    dotted = utils.process_results(docs[0], [docs[0]["answer"] + "."])  # exact match drops punctuation, ANLS not
    assert dotted["exact_match"] == 1.0 and dotted["anls"] < 1.0
    with pytest.raises(visor.OutputError, match="pass --overwrite"):
        write_tasks(tmp_path / "data", tmp_path / "tasks")


@pytest.mark.parametrize("arch", ["qwen2.5-vl", "qwen3-vl", "internvl"])
def test_other_families_answer_through_the_lmms_model_as_through_generate(checkpoints, pictures, tmp_path, arch):
    """The lmms-eval model on Qwen-VL and InternVL checkpoints: batched requests (one image, two, a
    text-only one) get generate's answers, and each sample's FLOPs are generate's (the tower counted
    on the images' own grids / tiles)."""
    runner = Runner(
        str(checkpoints[arch]), budget="1", batch_size="3", device="cpu", flops_file=str(tmp_path / "f.json")
    )
    requests = [
        Request(chat("What is shown?", pictures[0]), {"max_new_tokens": 5}, "t", 0),
        Request(chat("Compare them.", pictures[1], pictures[3]), {"max_new_tokens": 5}, "t", 1),
        Request(chat("Is there text?"), {"max_new_tokens": 5}, "t", 2),
    ]
    answers = runner.generate(requests)
    model = visor.load(checkpoints[arch], device="cpu")
    samples = json.loads(runner.flops_file.read_text())["samples"]
    for r, a, s in zip(requests, answers, samples):
        prompt, images = split_messages(r.messages)
        alone = model.generate(images, prompt, budget=1, max_new_tokens=5)
        assert a.text == alone.text and a.n_input == alone.n_visual + alone.n_text
        assert s["lm_prefill"] == alone.flops["lm_prefill"] and s["prefill"] == alone.flops["prefill"]
