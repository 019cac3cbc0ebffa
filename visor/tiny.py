"""Tiny, complete, random-weight checkpoints built offline with the real transformers classes.

``visor tiny-model`` writes everything a real LLaVA / LLaVA-OneVision checkpoint has: config,
safetensors weights, a byte-level BPE tokenizer (trained here on a built-in corpus), the image
processor config, the processor config and the chat template. Tests and the demo use them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checks
from .errors import ConfigError
from .outputs import write_dir

ARCHS = ("llava-onevision", "llava", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "internvl")
QWEN = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")

# The real checkpoints' chat templates (one user turn, images first), without generation tags.
OV_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] }}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN_TEMPLATE = (  # Qwen2-VL's and Qwen2.5-VL's: a default system turn, each image in vision start/end tags
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN3_TEMPLATE = QWEN_TEMPLATE.replace(  # Qwen3-VL's: no default system turn
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}",
    "",
)
INTERNVL_TEMPLATE = (  # InternVL's (-hf): each image a context token the processor expands to <img> ... </img>
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

CORPUS = """
user
assistant
Which
What
How
Is
Describe
What is shown in the image? Describe the picture. Which colour dominates the image? red green blue
yellow purple orange black white grey Which digit is in the red box? Which digit is in row 1, column 2?
What is the value in the row labelled apple? What value is written on the pear bar? What is the first
word of line 3? second third fourth How many large shapes are there? Is this a chart or a table?
chart table Which quadrant holds the object? top left top right bottom left bottom right yes no
apple pear plum lime fig kiwi mango melon grape peach lemon cherry one two three four five six seven
eight nine zero 0 1 2 3 4 5 6 7 8 9 10 11 12 20 50 99 100 the a of in is are what which where how
"""


@dataclass
class TinySpec:
    arch: str = "llava-onevision"
    layers: int = 6
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 0  # 0 = 2 * vision_hidden
    image_size: int = 32  # vision tower input; AnyRes tiles are this size
    patch_size: int = 8
    max_positions: int = 4096
    vocab_size: int = 640  # BPE target size (bytes + merges), specials come on top
    seed: int = 0


def build_tokenizer(arch: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if arch == "llava-onevision":
        specials = dict(pad_token="<|endoftext|>", eos_token="<|im_end|>")
        extra = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    elif arch in QWEN:
        specials = dict(pad_token="<|endoftext|>", eos_token="<|im_end|>")
        extra = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
        extra += ["<|image_pad|>", "<|video_pad|>"]
    elif arch == "internvl":
        specials = dict(pad_token="<|endoftext|>", eos_token="<|im_end|>")
        extra = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    else:
        specials = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
        extra = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=extra,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 8, trainer=trainer)
    if arch == "llava":  # Llama tokenizers prepend <s>, as HF's LLaVA processor then does
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if arch == "internvl":  # the names InternVL's processor reads the image tokens by
        specials["extra_special_tokens"] = {
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        }
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    fast.add_special_tokens({"additional_special_tokens": [t for t in extra if t not in specials.values()]})
    return fast


def build_tiny(out: str | Path, spec: TinySpec | None = None, overwrite: bool = False) -> Path:
    """Write a complete random checkpoint of ``spec`` to ``out`` and return the path (``out``:
    new, empty, or with ``overwrite`` an earlier checkpoint of visor's; see visor.outputs)."""
    spec = spec or TinySpec()
    if spec.arch not in ARCHS:
        raise ConfigError(f"unknown --arch {spec.arch!r}; choose one of {', '.join(ARCHS)}")
    for name in ("layers", "hidden", "heads", "kv_heads", "intermediate", "image_size", "patch_size"):
        checks.count(name, getattr(spec, name), 1)
    if spec.hidden % spec.heads or spec.heads % spec.kv_heads:
        raise ConfigError("hidden must be divisible by heads, and heads by kv_heads")
    if spec.image_size % spec.patch_size:
        raise ConfigError(f"image_size {spec.image_size} must be a multiple of patch_size {spec.patch_size}")
    return write_dir(out, "checkpoint", lambda tmp: _write_tiny(tmp, spec), overwrite=overwrite)


def _write_tiny(out: Path, spec: TinySpec) -> None:
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tokenizer = build_tokenizer(spec.arch, spec.vocab_size)
    if spec.arch in QWEN:
        return _write_tiny_qwen(out, spec, tokenizer)
    if spec.arch == "internvl":
        return _write_tiny_internvl(out, spec, tokenizer)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    text = _text_config(spec, tokenizer, tie_word_embeddings=spec.arch == "llava-onevision")
    vision = dict(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate or 2 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )
    n_side = spec.image_size // spec.patch_size
    s = spec.image_size
    if spec.arch == "llava-onevision":
        config = LlavaOnevisionConfig(
            text_config=dict(model_type="qwen2", rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **text),
            vision_config=dict(model_type="siglip_vision_model", vision_use_head=False, **vision),
            image_token_id=image_token_id,
            video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
            image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]],
            tie_word_embeddings=True,
        )
        model_cls = LlavaOnevisionForConditionalGeneration
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": s, "width": s},
            crop_size={"height": s, "width": s},
            image_grid_pinpoints=config.image_grid_pinpoints,
        )
        processor = {
            "processor_class": "LlavaOnevisionProcessor",
            "num_image_tokens": n_side**2,
            "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": "anyres_max_9",
        }
        template = OV_TEMPLATE
    else:
        config = LlavaConfig(
            text_config=dict(model_type="llama", **text),
            vision_config=dict(model_type="clip_vision_model", projection_dim=spec.vision_hidden, **vision),
            image_token_id=image_token_id,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        model_cls = LlavaForConditionalGeneration
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
        processor = {
            "processor_class": "LlavaProcessor",
            "patch_size": spec.patch_size,
            "image_token": "<image>",
            "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1,
        }
        template = LLAVA_TEMPLATE
    _save(out, spec, model_cls, config, tokenizer, image_processor, processor, template)


def _text_config(spec: TinySpec, tokenizer, **extra) -> dict:
    """The language model's config: the spec's shape, the tokenizer's vocabulary and special tokens."""
    return dict(
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=spec.max_positions,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _save(out: Path, spec: TinySpec, model_cls, config, tokenizer, image_processor, processor: dict, template: str):
    config.text_config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(spec.seed)
    model = model_cls(config)
    with torch.no_grad():  # HF initialises with std 0.02; larger weights make random logits less flat
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(template)


def _write_tiny_qwen(out: Path, spec: TinySpec, tokenizer) -> None:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: a dynamic-resolution tower (patches merged 2 x 2 into one visual
    token) and multimodal RoPE (``mrope_section`` splits the rotary frequencies over time, height
    and width); images are resized to multiples of 2 patches, between 4 and 64 visual tokens."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ids = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>") for name in ("image_pad", "video_pad")}
    ids |= {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>") for name in ("vision_start", "vision_end")}
    head_dim = spec.hidden // spec.heads
    t = head_dim // 2 // 4  # mrope_section splits the head_dim / 2 frequencies t : h : w = 2 : 3 : 3, as 16, 24, 24
    section = [t, (head_dim // 2 - t) // 2, head_dim // 2 - t - (head_dim // 2 - t) // 2]
    if spec.arch == "qwen3-vl":  # interleaved t h w t h w ...: h and w each take every third frequency (24, 20, 20)
        hw = (head_dim // 2 - 1) // 3
        section = [head_dim // 2 - 2 * hw, hw, hw]
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}
    text = _text_config(spec, tokenizer, rope_parameters=rope, bos_token_id=None)
    vision = dict(
        depth=spec.vision_layers,
        num_heads=spec.vision_heads,
        patch_size=spec.patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    if spec.arch == "qwen2-vl":
        vision |= dict(embed_dim=spec.vision_hidden, hidden_size=spec.hidden, mlp_ratio=2)
        config_cls, model_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    elif spec.arch == "qwen3-vl":  # Qwen3 LM (q/k norms), DeepStack: tower layers 0 and 1 feed LM layers 0 and 1
        text |= dict(head_dim=head_dim)
        text["rope_parameters"] |= dict(mrope_interleaved=True)
        vision |= dict(
            hidden_size=spec.vision_hidden,
            out_hidden_size=spec.hidden,
            intermediate_size=spec.vision_intermediate or 2 * spec.vision_hidden,
            num_position_embeddings=64,
            deepstack_visual_indexes=list(range(min(2, spec.vision_layers))),
        )
        config_cls, model_cls = Qwen3VLConfig, Qwen3VLForConditionalGeneration
    else:  # windowed attention in windows of 2 x 2 visual tokens, full attention in the last block
        vision |= dict(
            hidden_size=spec.vision_hidden,
            out_hidden_size=spec.hidden,
            intermediate_size=spec.vision_intermediate or 2 * spec.vision_hidden,
            window_size=4 * spec.patch_size,
            fullatt_block_indexes=[spec.vision_layers - 1],
        )
        config_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    config = config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image_pad"],
        video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=True,
    )
    unit = 2 * spec.patch_size  # one visual token's side in pixels
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=spec.patch_size, merge_size=2, temporal_patch_size=2, min_pixels=4 * unit**2, max_pixels=64 * unit**2
    )
    processor = {"processor_class": model_cls.__name__.replace("ForConditionalGeneration", "Processor")}
    template = QWEN3_TEMPLATE if spec.arch == "qwen3-vl" else QWEN_TEMPLATE
    _save(out, spec, model_cls, config, tokenizer, image_processor, processor, template)


def _write_tiny_internvl(out: Path, spec: TinySpec, tokenizer) -> None:
    """InternVL (3): an InternViT tower (CLS token, layer scale) on image_size tiles, the image cut into
    up to 6 tiles + a thumbnail, a pixel-shuffle projector (2 x 2 patches -> one token), Qwen2 LM."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tokens_per_tile = (spec.image_size // spec.patch_size) ** 2 // 4
    config = InternVLConfig(
        text_config=_text_config(
            spec, tokenizer, model_type="qwen2", rope_parameters={"rope_type": "default", "rope_theta": 1e6}
        ),
        vision_config=dict(
            hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_intermediate or 2 * spec.vision_hidden,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=spec.vision_heads,
            image_size=[spec.image_size, spec.image_size],
            patch_size=[spec.patch_size, spec.patch_size],
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=tokens_per_tile,
        downsample_ratio=0.5,
        tie_word_embeddings=True,
    )
    side = spec.image_size
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": side, "width": side}, crop_to_patches=False, min_patches=1, max_patches=6
    )  # crop_to_patches false here, as in the released checkpoints: the processor tiles regardless
    processor = {"processor_class": "InternVLProcessor", "image_seq_length": tokens_per_tile}
    _save(out, spec, InternVLForConditionalGeneration, config, tokenizer, image_processor, processor, INTERNVL_TEMPLATE)
