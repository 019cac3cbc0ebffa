"""Prompts are built exactly as Hugging Face's processor builds them."""

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

import visor

PROMPT = "What is shown?"


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
    sample's crop count (dynamic resolution: patch grids) is what the tower was given for it (counted
    by a hook here)."""
    from visor.backbone import load_image

    bb = base_model.backbone
    batch = [[images[1]], [images[0], images[2]], [], [images[3]]]  # one image (tiled), two, none, one
    loaded = [[load_image(p) for p in sample] for sample in batch]
    seen = []
    tower = getattr(bb.hf.model, "vision_tower", None) or bb.hf.model.visual
    first = lambda args, kwargs: args[0] if args else next(iter(kwargs.values()))  # noqa: E731 - pixels, however passed
    hook = tower.register_forward_pre_hook(lambda m, args, kw: seen.append(first(args, kw).shape[0]), with_kwargs=True)
    try:
        with torch.no_grad():
            together = bb.image_features_batch(loaded)
            alone = [bb.image_features_batch([sample])[0] for sample in loaded]
    finally:
        hook.remove()
    if together[0].grids is not None:  # the tower's input: every image's patches, flattened
        patches = [sum(t * h * w for t, h, w in v.grids or []) for v in together]
        assert seen == [sum(patches), *(p for p in patches if p)]  # the batch in one pass, then alone
        assert [v.grids for v in together] == [v.grids for v in alone]
    else:
        assert sum(seen[1:]) == seen[0] == sum(v.n_crops for v in together)  # the batch's crops, in one pass
        assert [v.n_crops for v in together] == [v.n_crops for v in alone] == seen[1:][:2] + [0] + seen[1:][2:]
    for v, reference in zip(together, alone):
        assert len(v.features) == len(reference.features)
        assert all(torch.allclose(f, r, atol=1e-5) for f, r in zip(v.features, reference.features))


def without_video(processor_class):
    """The family's HF processor, built without a video processor (which needs torchvision)."""

    class WithoutVideo(processor_class):
        def check_argument_for_proper_class(self, name, argument):
            if name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(name, argument)

    return WithoutVideo


@pytest.mark.parametrize("arch", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def test_qwen_inputs_are_what_its_processor_builds(checkpoints, images, arch):
    """Ids, patch grids, image-token types, visual features and M-RoPE positions are those of the
    family's own HF processor and model (its Processor needs torchvision only for videos: a subclass
    here takes none)."""
    import transformers

    from visor.backbone import user_turn

    bb = visor.load(checkpoints[arch]).backbone
    base = {
        "qwen2-vl": transformers.Qwen2VLProcessor,
        "qwen2.5-vl": transformers.Qwen2_5_VLProcessor,
        "qwen3-vl": transformers.Qwen3VLProcessor,
    }[arch]

    processor = without_video(base)(bb.image_processor, bb.tokenizer, None, chat_template=bb.chat_template)
    for paths in ([images[0]], [images[1], images[3]]):
        text = processor.apply_chat_template(
            [user_turn(PROMPT, len(paths))], add_generation_prompt=True, tokenize=False
        )
        ref = processor(text=[text], images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")
        sample = bb.encode(PROMPT, paths)
        assert ref["input_ids"][0].tolist() == sample.ids
        assert ref["image_grid_thw"].tolist() == [list(g) for g in sample.grids]
        assert ref["mm_token_type_ids"][0].tolist() == [int(i == bb.image_token_id) for i in sample.ids]
        with torch.no_grad():
            out = bb.hf.model.get_image_features(ref["pixel_values"], ref["image_grid_thw"])
            positions, _ = bb.hf.model.get_rope_index(ref["input_ids"], ref["mm_token_type_ids"], ref["image_grid_thw"])
        assert torch.allclose(torch.cat(out.pooler_output), sample.visual, atol=1e-6)
        assert torch.equal(positions[:, 0].T, sample.positions)
        if arch == "qwen3-vl":  # DeepStack: the tower's intermediate features, per level
            deepstack = torch.stack([torch.cat(level) for level in out.deepstack_features])
            assert deepstack.shape[0] == 2 and torch.allclose(deepstack, sample.deepstack, atol=1e-6)


def test_internvl_inputs_are_what_its_processor_builds(checkpoints, images):
    """Ids (<img>, the context tokens, </img>) and visual features are those of InternVL's own processor,
    which tiles every image (its default) although the saved image processor says crop_to_patches=false."""
    import transformers

    from visor.backbone import user_turn

    bb = visor.load(checkpoints["internvl"]).backbone
    assert bb.image_processor.crop_to_patches is False

    seq = bb.config.image_seq_length
    processor = without_video(transformers.InternVLProcessor)(
        bb.image_processor, bb.tokenizer, None, image_seq_length=seq, chat_template=bb.chat_template
    )
    for paths in ([images[1]], [images[0], images[3]]):
        text = processor.apply_chat_template(
            [user_turn(PROMPT, len(paths))], add_generation_prompt=True, tokenize=False
        )
        ref = processor(text=[text], images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")
        sample = bb.encode(PROMPT, paths)
        assert ref["input_ids"][0].tolist() == sample.ids
        assert sample.n_crops == ref["pixel_values"].shape[0] > len(paths)  # tiled
        with torch.no_grad():
            features = bb.hf.model.get_image_features(ref["pixel_values"]).pooler_output
        assert torch.allclose(features.flatten(0, 1), sample.visual, atol=1e-6)


def test_a_batch_led_by_a_text_only_prompt_keeps_the_model_dtype(checkpoints, images):
    """The padded visual buffers of a batch take the model's dtype even where its first prompt has no
    image (and so no features to take it from)."""
    from visor.generate import collate

    bb = visor.load(checkpoints["qwen3-vl"], dtype="bfloat16").backbone
    tok = collate([bb.encode("Hi", []), bb.encode(PROMPT, [images[0]])], bb.image_token_id, "cpu")
    assert tok.visual.dtype == tok.deepstack.dtype == torch.bfloat16 and tok.visual.shape[1] > 0
