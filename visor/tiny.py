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

ARCHS = ("llava-onevision", "llava")

# The real checkpoints' chat templates (one user turn, images first), without generation tags.
OV_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] }}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
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
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    text = dict(
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=spec.arch == "llava-onevision",
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
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
