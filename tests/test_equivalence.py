"""budget="full" is the base model: our forward against Hugging Face's own, both backbones."""

import pytest
import torch
from conftest import greedy
from PIL import Image

from visor.backbone import MROPE

PROMPTS = ["What is shown in the image?", "Which colour dominates?"]


def hf_reference(model, prompts, image_lists, n_new):
    """Greedy tokens and per-step logits from HF generate, left-padded batch."""
    bb = model.backbone
    samples = [bb.encode(p, ims) for p, ims in zip(prompts, image_lists)]
    width = max(len(s.ids) for s in samples)
    pad = bb.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(s.ids)) + s.ids for s in samples])
    mask = torch.tensor([[0] * (width - len(s.ids)) + [1] * len(s.ids) for s in samples])
    pil = [[Image.open(p).convert("RGB") for p in ims] for ims in image_lists]
    if bb.config.model_type == "llava_onevision":
        extra = dict(bb.image_processor(pil, return_tensors="pt"))
    elif bb.config.model_type == "internvl":  # every image's tiles, as its processor cuts them
        flat = [im for ims in pil for im in ims]
        extra = {"pixel_values": bb.image_processor(flat, crop_to_patches=True, return_tensors="pt")["pixel_values"]}
    elif bb.config.model_type in MROPE:  # pixel values + patch grids; M-RoPE needs each token's modality
        extra = dict(bb.image_processor([im for ims in pil for im in ims], return_tensors="pt"))
        extra["mm_token_type_ids"] = (ids == bb.image_token_id).int()
    else:
        extra = {
            "pixel_values": bb.image_processor([im for ims in pil for im in ims], return_tensors="pt")["pixel_values"]
        }
    with torch.no_grad():
        out = bb.hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            **extra,
        )
    return out.sequences[:, width:], torch.stack(out.logits, 1), samples  # (B, n_new), (B, n_new, V)


@pytest.mark.parametrize("case", ["single", "batched", "two-images"])
def test_full_budget_equals_hugging_face(base_model, images, case):
    """One image; a batch of two prompts of different lengths; two images of different sizes."""
    prompts = PROMPTS if case == "batched" else PROMPTS[:1]
    cases = {"single": [[images[0]]], "batched": [[images[0]], [images[1]]], "two-images": [[images[1], images[3]]]}
    image_lists = cases[case]
    hf_tokens, hf_logits, samples = hf_reference(base_model, prompts, image_lists, 16)
    with torch.no_grad():
        tokens, logits = greedy(base_model, samples, 16, "full")
    assert (logits[:, 0] - hf_logits[:, 0]).abs().max() <= 1e-4  # prefill logits
    assert torch.equal(tokens, hf_tokens)  # 16 greedy tokens
    assert (logits - hf_logits).abs().max() <= 1e-4  # and every decode step


def test_generate_api_equals_hugging_face(base_model, images):
    hf_tokens, _, _ = hf_reference(base_model, PROMPTS[:1], [[images[2]]], 16)
    g = base_model.generate(images[2], PROMPTS[0], budget="full", max_new_tokens=16)
    eos = base_model.backbone.eos_token_ids
    expected = hf_tokens[0].tolist()
    cut = next((i + 1 for i, t in enumerate(expected) if t in eos), len(expected))
    assert g.token_ids == expected[:cut]


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    ],
    ids=["linear", "yarn"],
)
def test_scaled_rope_equals_hugging_face(checkpoints, images, tmp_path, rope):
    """RoPE comes from the checkpoint's own rotary embedding: a scaled RoPE (positions and attention
    scaling changed) still gives HF's logits and tokens."""
    import json
    import shutil

    import visor

    path = tmp_path / "scaled"
    shutil.copytree(checkpoints["llava-onevision"], path)
    config = json.loads((path / "config.json").read_text())
    text = config["text_config"]
    text["rope_parameters"] = {"rope_theta": (text.get("rope_parameters") or {}).get("rope_theta", 10000.0), **rope}
    (path / "config.json").write_text(json.dumps(config))
    model = visor.load(path)
    assert model.lm.rotary.hf.rope_type == rope["rope_type"]
    hf_tokens, hf_logits, samples = hf_reference(model, PROMPTS[:1], [[images[1]]], 8)
    with torch.no_grad():
        tokens, logits = greedy(model, samples, 8, "full")
    assert torch.equal(tokens, hf_tokens)
    assert (logits - hf_logits).abs().max() <= 1e-4
    unscaled = greedy(visor.load(checkpoints["llava-onevision"]), samples, 8, "full")[1]
    assert (unscaled[:, 0] - logits[:, 0]).abs().max() > 1e-3  # the scaling really changed the numbers
