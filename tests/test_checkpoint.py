"""Save / load / convert: bit-exact round trips, and a base checkpoint stays a base checkpoint."""

import json

import pytest
import torch
from conftest import set_visor_weights
from safetensors.torch import load_file

import visor


def all_tensors(model):
    return {**{f"hf.{k}": v for k, v in model.backbone.hf.state_dict().items()}, **model.lm.visor_state_dict()}


@pytest.mark.parametrize("position_encoding", ["rope", "conv"])
def test_convert_save_load_round_trip_is_bit_exact(checkpoints, arch, images, tmp_path, position_encoding):
    out = visor.convert(checkpoints[arch], tmp_path / "v", position_encoding=position_encoding)
    meta = json.loads((out / "visor.json").read_text())
    assert meta["schedule"]["position_encoding"] == position_encoding
    for name in ["tokenizer.json", "chat_template.jinja", "preprocessor_config.json", "processor_config.json"]:
        assert (out / name).read_bytes() == (checkpoints[arch] / name).read_bytes()
    model = visor.load(out)
    gates = [v for k, v in model.lm.visor_state_dict().items() if k.endswith("gate")]
    assert gates and all(g.item() == 0.0 for g in gates)  # freshly converted: CA layers start as no-ops

    set_visor_weights(model, seed=3, scale=0.7)
    model.save(tmp_path / "trained")
    again = visor.load(tmp_path / "trained")
    before, after = all_tensors(model), all_tensors(again)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    kwargs = dict(budget=1, max_new_tokens=6)
    assert (
        model.generate(images[0], "What?", **kwargs).token_ids == again.generate(images[0], "What?", **kwargs).token_ids
    )


def test_save_replaces_an_existing_checkpoint_atomically(checkpoints, tmp_path):
    out = visor.convert(checkpoints["llava-onevision"], tmp_path / "v")
    model = visor.load(out)
    set_visor_weights(model, scale=0.3)
    model.save(tmp_path / "v2")
    with pytest.raises(visor.OutputError, match="pass --overwrite"):
        visor.load(tmp_path / "v2").save(out)  # an earlier checkpoint is replaced only when asked
    visor.load(tmp_path / "v2").save(out, overwrite=True)
    gates = {k: v for k, v in load_file(out / "visor.safetensors").items() if k.endswith("gate")}
    assert all(v.item() == pytest.approx(0.3) for v in gates.values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_a_visor_checkpoint_keeps_its_schedule(checkpoints, tmp_path):
    out = visor.convert(checkpoints["llava"], tmp_path / "v", schedule="sa,sa,ca,ca,text,text")
    assert visor.load(out).schedule.roles == ["sa", "sa", "ca", "ca", "text", "text"]
    with pytest.raises(visor.ConfigError, match="its own schedule"):
        visor.load(out, schedule="sa,ca,text,sa,ca,text")


def test_convert_refuses_to_overwrite_its_source(checkpoints):
    for overwrite in (False, True):
        with pytest.raises(visor.OutputError, match="is the input"):
            visor.convert(checkpoints["llava"], checkpoints["llava"], overwrite=overwrite)


def test_converting_a_visor_checkpoint_copies_it(checkpoints, tmp_path):
    first = visor.convert(checkpoints["llava"], tmp_path / "v", schedule="sa,sa,ca,ca,text,text")
    again = visor.convert(first, tmp_path / "v2")
    assert visor.load(again).schedule.roles == ["sa", "sa", "ca", "ca", "text", "text"]
    with pytest.raises(visor.ConfigError, match="already a VISOR checkpoint"):
        visor.convert(first, tmp_path / "v3", position_encoding="conv")


# ---- adapters: convert, stage 1 and train-policy write only what VISOR adds -------------------------


def digest(path):
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def bf16_base(checkpoints, tmp_path_factory):
    """The tiny base, stored in bfloat16 as most real checkpoints are."""
    import shutil

    from transformers import LlavaOnevisionForConditionalGeneration

    src, out = checkpoints["llava-onevision"], tmp_path_factory.mktemp("bf16") / "base"
    LlavaOnevisionForConditionalGeneration.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(out)
    for f in src.iterdir():
        if not (out / f.name).exists():
            shutil.copy2(f, out / f.name)
    return out


def test_convert_writes_an_adapter_in_the_base_dtype(bf16_base, tmp_path):
    before = digest(bf16_base)
    out = visor.convert(bf16_base, tmp_path / "adapter")
    assert not (out / "model.safetensors").exists()
    assert json.loads((out / "visor.json").read_text())["base"] == str(bf16_base.resolve())
    tensors = load_file(out / "visor.safetensors")
    assert tensors and all(t.dtype == torch.bfloat16 for t in tensors.values())
    added_bytes = sum(t.numel() * 2 for t in tensors.values())
    assert (out / "visor.safetensors").stat().st_size < added_bytes + 64_000  # the added parameters only
    assert digest(bf16_base) == before  # the base is read, never written
    model = visor.load(out, dtype="bfloat16")
    assert model.backbone.weights_path == bf16_base and model.lm.lm_head.weight.dtype == torch.bfloat16


def test_adapter_load_and_export_round_trip_bit_exact(checkpoints, images, tmp_path):
    model = visor.load(visor.convert(checkpoints["llava"], tmp_path / "a1"))
    set_visor_weights(model, seed=5, scale=0.4)
    adapter = model.save(tmp_path / "a2", adapter=True)
    again = visor.load(adapter)
    assert all(torch.equal(a, b) for a, b in zip(all_tensors(model).values(), all_tensors(again).values()))
    merged = visor.export(adapter, tmp_path / "merged")
    assert (merged / "model.safetensors").is_file() and "base" not in json.loads((merged / "visor.json").read_text())
    full = visor.load(merged)
    assert all_tensors(full).keys() == all_tensors(again).keys()
    assert all(torch.equal(all_tensors(full)[k], v) for k, v in all_tensors(again).items())
    kwargs = dict(budget=1, max_new_tokens=5)
    assert (
        full.generate(images[0], "What?", **kwargs).token_ids == model.generate(images[0], "What?", **kwargs).token_ids
    )


def test_an_adapter_whose_base_moved(checkpoints, tmp_path):
    import shutil

    base = shutil.copytree(checkpoints["llava"], tmp_path / "base")
    adapter = visor.convert(base, tmp_path / "adapter")
    base.rename(tmp_path / "moved")
    with pytest.raises(visor.CheckpointError, match="which is not there"):
        visor.load(adapter)
    assert visor.load(adapter, base=tmp_path / "moved").backbone.weights_path == tmp_path / "moved"
    with pytest.raises(visor.CheckpointError, match="is not the model"):
        visor.load(adapter, base=checkpoints["llava-onevision"])
    with pytest.raises(visor.CheckpointError, match="not an adapter"):
        visor.load(checkpoints["llava"], base=tmp_path / "moved")  # a checkpoint with weights of its own
