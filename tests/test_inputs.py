"""Prompts are built exactly as Hugging Face's processor builds them."""

import torch
from PIL import Image
from transformers import AutoProcessor

import visor


def test_llava_prompt_ids_equal_the_hf_processor(checkpoints, images):
    processor = AutoProcessor.from_pretrained(checkpoints["llava"])  # LLaVA's needs no torchvision
    model = visor.load(checkpoints["llava"])
    for which in ([0], [1, 2]):
        pil = [Image.open(images[i]).convert("RGB") for i in which]
        content = [{"type": "image"}] * len(pil) + [{"type": "text", "text": "What is shown?"}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        assert text == model.backbone.prompt_text("What is shown?", len(pil))
        expected = processor(images=pil, text=[text], return_tensors="pt")["input_ids"][0].tolist()
        assert model.backbone.encode("What is shown?", pil).ids == expected


def test_onevision_anyres_token_counts_follow_the_image_size(checkpoints, images):
    model = visor.load(checkpoints["llava-onevision"])
    counts = [model.backbone.encode("Hi", [im]).visual.shape[0] for im in images]
    assert len(set(counts)) > 1  # AnyRes: bigger / wider images get more tokens
    two = model.backbone.encode("Hi", images[:2])
    assert two.visual.shape[0] == 2 * (16 + 1)  # several images: base crop + newline each, as in HF


def test_conv_position_code(checkpoints, images):
    roles = visor.load(checkpoints["llava-onevision"]).schedule.roles
    model = visor.load(checkpoints["llava-onevision"], schedule={"roles": roles, "position_encoding": "conv"})
    conv = model.lm.pos_conv
    v = torch.randn(2, 10, model.lm.cfg.hidden)
    valid = torch.tensor([[True] * 10, [True] * 6 + [False] * 4])
    with torch.no_grad():
        assert torch.equal(conv(v, valid)[valid], v[valid])  # zero-initialised: the identity
        before = model.generate(images[1], "What is shown?", budget=1, max_new_tokens=8).token_ids
        conv.pointwise.weight.normal_(0, 0.2)
        out = conv(v, valid)
        assert not torch.allclose(out[valid], v[valid])
        alone = conv(v[1:, :6], valid[1:, :6])
        assert torch.allclose(out[1, :6], alone[0], atol=1e-6)  # padding does not leak into real tokens
    after = model.generate(images[1], "What is shown?", budget=1, max_new_tokens=8).token_ids
    assert before != after


def test_one_pass_of_the_tower_for_a_batch(base_model, images):
    """Training encodes a step's images in one pass: the same features as sample by sample, and each
    sample's crop count is what the tower was given for it (counted by a hook here)."""
    from visor.backbone import load_image

    bb = base_model.backbone
    batch = [[images[1]], [images[0], images[2]], [], [images[3]]]  # one image (tiled), two, none, one
    loaded = [[load_image(p) for p in sample] for sample in batch]
    seen = []
    hook = bb.hf.model.vision_tower.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            together = bb.image_features_batch(loaded)
            alone = [bb.image_features_batch([sample])[0] for sample in loaded]
    finally:
        hook.remove()
    assert sum(seen[1:]) == seen[0] == sum(n for _, n in together)  # the batch's crops, in one pass
    assert [n for _, n in together] == [n for _, n in alone] == seen[1:][:2] + [0] + seen[1:][2:]
    for (feats, _), (reference, _) in zip(together, alone):
        assert len(feats) == len(reference)
        assert all(torch.allclose(f, r, atol=1e-5) for f, r in zip(feats, reference))
