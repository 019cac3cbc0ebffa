"""A Hugging Face LVLM checkpoint: its weights, vision path, tokenizer, image processor, template.

Everything visual (vision tower, projector, AnyRes tiling, image-newline tokens, Qwen-VL's
dynamic-resolution patch merging) is the checkpoint's own code, called through the model's public
``get_image_features``. The prompt is built the way HF's processor builds it: the chat template
renders one user turn with the images first, and each image placeholder is expanded to as many
tokens as the vision path yields; with multimodal RoPE (Qwen-VL) every token also gets the (time,
row, column) position the model's own ``get_rope_index`` gives it. (We don't build HF's processor
itself: those of LLaVA-OneVision and Qwen-VL need torchvision for their video part.)
"""

from __future__ import annotations

import inspect
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image

from .errors import CheckpointError, ConfigError, InputError

# model_type of the checkpoint -> transformers class; and the language models we can run.
ARCHITECTURES = {
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
}
TEXT_MODELS = ("qwen2", "qwen3", "llama", "qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text")
MROPE = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # multimodal RoPE: visual tokens at (time, row, column) positions
IMAGES_PER_PASS = 8  # images encoded together at inference: bounds the tower's memory (an AnyRes image: <= 37 crops)


def read_config(path: str | Path):
    """The HF config of a checkpoint directory or a config.json file; unsupported -> error."""
    from transformers import AutoConfig

    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"no config.json at {path}: point --model at a checkpoint directory")
    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    model_type = raw.pop("model_type", None)
    if model_type not in ARCHITECTURES:
        supported = ", ".join(f"{k} ({v})" for k, v in ARCHITECTURES.items())
        raise CheckpointError(f"unsupported architecture {model_type!r}; supported: {supported}")
    try:
        config = AutoConfig.for_model(model_type, **raw)
    except Exception as e:  # noqa: BLE001 - any config error is the user's file
        raise CheckpointError(f"cannot read {file}: {e}") from None
    text_type = config.text_config.model_type
    if text_type not in TEXT_MODELS:
        raise CheckpointError(f"unsupported language model {text_type!r}; supported: {', '.join(TEXT_MODELS)}")
    return config


def find_chat_template(path: Path, tokenizer) -> str:
    """The processor's chat template (chat_template.jinja/.json), else the tokenizer's."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "processor_config.json"):
        if (path / name).is_file():
            template = json.loads((path / name).read_text()).get("chat_template")
            if template:
                return template
    if tokenizer.chat_template:
        return tokenizer.chat_template
    raise CheckpointError(f"{path} has no chat template (chat_template.jinja or in the tokenizer config)")


def load_image(image: str | Path | Image.Image) -> Image.Image:
    """An RGB image from a path or a PIL image; InputError for a missing, unreadable or huge file."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    path = Path(image)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():  # between 1x and 2x the limit PIL only warns: we refuse below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            if limit and im.width * im.height > limit:
                raise _too_large(path, f"{im.width} x {im.height} = {im.width * im.height:,}", limit)
            return to_rgb(im)
    except Image.DecompressionBombError as e:  # over twice the limit: PIL refuses to open it
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        raise _too_large(path, f"{int(pixels[1]):,}" if pixels else "too many", limit) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"cannot read image {path}: {e.__class__.__name__}: {e}") from None


def _too_large(path: Path, pixels: str, limit: int) -> InputError:
    return InputError(
        f"image {path} has {pixels} pixels, over PIL's decompression-bomb limit of {limit:,}: "
        "resize it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file"
    )


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB. 16- and 32-bit greyscale (mode I;16*, I) is scaled to 8 bits, not clipped."""
    if im.mode.startswith("I;16") or im.mode == "I":
        import numpy as np

        pixels = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 255.0
        im = Image.fromarray(np.clip(np.rint(pixels * (255.0 / top)), 0, 255).astype(np.uint8))
    return im.convert("RGB")


def _device_map(device) -> dict:
    """Straight onto a GPU where transformers can (it needs accelerate for that), else via the host."""
    import importlib.util

    if torch.device(device).type == "cuda" and importlib.util.find_spec("accelerate") is not None:
        return {"device_map": str(device)}
    return {}


@dataclass
class Sample:
    """One prompt with its images, ready for the language model."""

    ids: list[int]  # token ids, each image placeholder expanded to its feature count
    visual: torch.Tensor  # (Nv, D) projector outputs of all images, in order
    n_crops: int  # images/tiles the vision tower encoded (for FLOP accounting)
    labels: list[bool] | None = None  # training: True where the token is part of an answer
    positions: torch.Tensor | None = None  # (L, 3) multimodal RoPE positions (Qwen-VL); None: 0..L-1
    grids: list[tuple[int, int, int]] | None = None  # (t, h, w) patch grid per image (dynamic resolution)
    deepstack: torch.Tensor | None = None  # (K, Nv, D) Qwen3-VL: added to the visual states after LM layer k < K
    visionzip: tuple[int, int] | None = None  # the VisionZip setting its images were encoded with (encode_batch)


class Visual(NamedTuple):
    """What the vision path made of one sample's images."""

    features: list[torch.Tensor]  # (n_i, D) projector outputs per image
    n_crops: int  # images/tiles the tower encoded
    grids: list[tuple[int, int, int]] | None = None  # (t, h, w) patch grid per image (dynamic resolution)
    deepstack: list[list[torch.Tensor]] | None = None  # Qwen3-VL: per DeepStack layer, (n_i, D) per image


class Backbone:
    """``path``: the checkpoint (config, tokenizer, processor, template); ``weights``: the directory
    of its language-model weights when they live elsewhere (a VISOR adapter's base)."""

    def __init__(self, path: str | Path, dtype=torch.float32, device="cpu", attn_implementation="sdpa", weights=None):
        import transformers
        from transformers import AutoImageProcessor, AutoTokenizer

        self.path = path = Path(path)
        self.weights_path = Path(weights) if weights is not None else path
        self.config = read_config(path)
        cls = getattr(transformers, ARCHITECTURES[self.config.model_type])
        try:
            hf, info = cls.from_pretrained(
                self.weights_path,
                config=self.config,
                dtype=dtype,  # in the dtype asked for: no float32 copy of a bf16 checkpoint on the way
                attn_implementation=attn_implementation,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported below, as our error
                **_device_map(device),
            )
        except Exception as e:  # noqa: BLE001 - corrupt/truncated weights surface as many types
            raise CheckpointError(
                f"cannot load the weights in {self.weights_path}: {e.__class__.__name__}: {e}"
            ) from None
        problems = [f"{k} (missing from the file)" for k in info["missing_keys"]]
        problems += [f"{k} (in the file, not in the config)" for k in info["unexpected_keys"]]
        problems += [f"{k}: {tuple(a)} in the file, {tuple(b)} by the config" for k, a, b in info["mismatched_keys"]]
        if problems:
            more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
            raise CheckpointError(
                f"the weights in {self.weights_path} do not match its config.json: {'; '.join(problems[:3])}{more}"
            )
        self.hf = hf.to(device).eval()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.image_processor = AutoImageProcessor.from_pretrained(path)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot load the tokenizer/image processor in {path}: {e}") from None
        self.chat_template = find_chat_template(path, self.tokenizer)
        self.image_token_id = self.config.image_token_id
        if self.tokenizer.convert_ids_to_tokens(self.image_token_id) is None:
            raise CheckpointError(f"the tokenizer has no token for image_token_id={self.image_token_id}")
        # M-RoPE: newer 5.x releases' get_rope_index reads each token's modality (mm_token_type_ids)
        rope_index = getattr(self.hf.model, "get_rope_index", None)
        self.rope_index_reads_types = (
            rope_index is not None and "mm_token_type_ids" in inspect.signature(rope_index).parameters
        )
        self.image_brackets = ([], [])  # token ids around each image's tokens, where the processor adds them
        if self.config.model_type == "internvl":  # <img> ... </img>
            names = [
                getattr(self.tokenizer, f"{w}_image_token", None) or f"<{t}img>"
                for w, t in (("start", ""), ("end", "/"))
            ]
            ids = [self.tokenizer.convert_tokens_to_ids(n) for n in names]
            if None in ids or self.tokenizer.unk_token_id in ids:
                raise CheckpointError(
                    f"the tokenizer has no {' / '.join(names)} tokens, which InternVL puts around images"
                )
            self.image_brackets = ([ids[0]], [ids[1]])

    @property
    def device(self) -> torch.device:
        return self.hf.lm_head.weight.device

    @property
    def eos_token_ids(self) -> set[int]:
        eos = self.hf.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def prompt_text(self, prompt: str, n_images: int) -> str:
        return self.render([user_turn(prompt, n_images)], add_generation_prompt=True)

    def image_features(self, images: list[Image.Image], visionzip=None) -> Visual:
        """The projector outputs of one sample's images. Gradients flow when the caller enables them
        (training). ``visionzip`` (n, m): reduce each crop to n dominant + m contextual tokens (see
        visor.reduce)."""
        return self.image_features_batch([images], visionzip)[0]

    def image_features_batch(self, samples: list[list[Image.Image]], visionzip=None, towered=None) -> list[Visual]:
        """``image_features`` for several samples' images in one pass of the vision tower (``visionzip``: as
        there). ``towered``: the samples' tower outputs, kept from ``tower_batch`` (the tower does not run)."""
        if visionzip is not None:
            from .reduce import visionzip_features

            return visionzip_features(self, samples, *visionzip, towered=towered)
        present = [i for i, images in enumerate(samples) if images]
        if not present:
            return [Visual([], 0) for _ in samples]
        dtype = self.hf.lm_head.weight.dtype
        if towered is None and self.config.model_type in TOWERED:
            towered = self.tower_batch(samples)
        if towered is not None:
            from .reduce import visionzip_serves_plain

            if any(t.scores is not None for t in towered if t) and not visionzip_serves_plain(self.config):
                raise ConfigError(
                    "kept VisionZip tower outputs (its layer, CLS included) are not this model's plain path's"
                )
            encoded = _projected(self, [towered[i] for i in present], dtype)
        else:
            encoded = VISION_PATHS[self.config.model_type](self, [samples[i] for i in present], dtype)
        features, crops = iter(encoded.features), iter(encoded.crops)
        grids = None if encoded.grids is None else iter(encoded.grids)
        levels = [iter(level) for level in encoded.deepstack or []]
        visual = []
        for images in samples:
            if not images:
                visual.append(Visual([], 0))
                continue
            own_grids = None if grids is None else [next(grids) for _ in images]
            own_deepstack = [[next(level) for _ in images] for level in levels] or None
            visual.append(Visual([next(features) for _ in images], next(crops), own_grids, own_deepstack))
        return visual

    def tower_batch(self, samples: list[list[Image.Image]], scored: bool = False) -> list[Towered | None]:
        """What the vision tower makes of each sample's images, before the projector (None: no images),
        for ``image_features_batch``; ``scored``: VisionZip's part of the tower (``visor.reduce.visionzip_tower``),
        the feature layer's tokens with their scores and keys, as a reducing VisionZip setting reads them (and
        the plain path only where ``visor.reduce.visionzip_serves_plain``). LLaVA and LLaVA-OneVision, whose
        tower and projector are separate modules."""
        if self.config.model_type not in TOWERED:
            raise ConfigError(
                f"{self.config.model_type}: its vision tower and projector are one module here; "
                f"only {', '.join(TOWERED)} can keep the tower's output"
            )
        from .reduce import visionzip_tower

        with_images = [images for images in samples if images]
        if not with_images:
            return [None] * len(samples)
        if scored:
            towered = iter(visionzip_tower(self, with_images))
        else:
            towered = iter(_tower(self, with_images, self.hf.lm_head.weight.dtype))
        return [next(towered) if images else None for images in samples]

    def tower_digest(self, *more) -> str:
        """A digest of what the vision tower's output follows from: its weights, the feature layer and
        selection strategy, the crops (family, AnyRes grids, tower input size), the image processor, the
        device and dtype (and ``more``, JSON-serialisable)."""
        import hashlib

        digest = hashlib.sha256()
        for name, tensor in self.hf.model.vision_tower.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        config = self.config
        layer = [config.vision_feature_layer, config.vision_feature_select_strategy]
        crops = [config.model_type, getattr(config, "image_grid_pinpoints", None), config.vision_config.image_size]
        where = [str(self.device), str(self.hf.lm_head.weight.dtype)]
        digest.update(json.dumps([layer, crops, where, self.image_processor.to_json_string(), *more]).encode())
        return digest.hexdigest()

    def expand(self, ids: list[int], visual: Visual, labels=None) -> Sample:
        """Expand each image placeholder in ``ids`` to its image's feature count (and, with
        multimodal RoPE, give every token its position as the model's ``get_rope_index`` does)."""
        features = visual.features
        slots = [i for i, tok in enumerate(ids) if tok == self.image_token_id]
        if len(slots) != len(features):
            raise InputError(
                f"the prompt holds {len(slots)} image placeholder(s) for {len(features)} image(s); "
                "don't write image tokens into the prompt, pass the images instead"
            )
        before, after = self.image_brackets
        expanded, expanded_labels, start = [], [], 0
        for slot, feats in zip(slots, features):
            expanded += ids[start:slot] + before + [self.image_token_id] * feats.shape[0] + after
            if labels is not None:
                expanded_labels += labels[start:slot] + [False] * (len(before) + feats.shape[0] + len(after))
            start = slot + 1
        expanded += ids[start:]
        limit = self.config.text_config.max_position_embeddings
        if len(expanded) >= limit:
            raise InputError(
                f"prompt + image tokens = {len(expanded)} tokens, over the model's context of {limit}; "
                "use a shorter prompt or smaller/fewer images"
            )
        hidden = self.config.text_config.hidden_size
        empty = torch.zeros(0, hidden, device=self.device, dtype=self.hf.lm_head.weight.dtype)
        visual_states = torch.cat(features) if features else empty
        labels = None if labels is None else expanded_labels + labels[start:]
        positions = None
        if self.config.model_type in MROPE:
            ids_t = torch.tensor([expanded])
            kwargs = {"image_grid_thw": torch.tensor(visual.grids) if visual.grids else None}
            if self.rope_index_reads_types:
                kwargs["mm_token_type_ids"] = (ids_t == self.image_token_id).int()
            positions, _ = self.hf.model.get_rope_index(input_ids=ids_t, **kwargs)
            positions = positions[:, 0].T.contiguous()  # (L, 3)
        deepstack = None
        if visual.deepstack:  # a sample without images still needs the levels, empty
            deepstack = torch.stack([torch.cat(level) for level in visual.deepstack])
        elif getattr(self.config.vision_config, "deepstack_visual_indexes", None):
            deepstack = torch.zeros(len(self.config.vision_config.deepstack_visual_indexes), 0, hidden)
            deepstack = deepstack.to(visual_states)
        return Sample(expanded, visual_states, visual.n_crops, labels, positions, visual.grids, deepstack)

    def encode(self, prompt: str, images: list, visionzip=None) -> Sample:
        """Template + tokenise one prompt, run the vision path, expand the placeholders."""
        return self.encode_batch([prompt], [images], visionzip)[0]

    @torch.no_grad()
    def encode_batch(self, prompts: list[str], images: list[list], visionzip=None, towered=None) -> list[Sample]:
        """``encode`` for several prompts (one list of images each): the vision path runs on up to
        ``IMAGES_PER_PASS`` images at once (a sample's images together). ``towered``: each prompt's
        tower output, kept from ``tower_batch`` (scored for a VisionZip setting that reduces; the tower
        does not run and the images are not read)."""
        if len(prompts) != len(images):
            raise InputError(f"{len(prompts)} prompt(s) but {len(images)} image entries")
        if towered is not None and len(towered) != len(prompts):
            raise InputError(f"{len(prompts)} prompt(s) but {len(towered)} kept tower outputs")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise InputError("the prompt is empty" + (f" (prompt {i + 1} of {len(prompts)})" if i else ""))
        loaded = images if towered is not None else [[load_image(im) for im in ims] for ims in images]
        visual = []
        for members in passes(loaded):
            kept = None if towered is None else [towered[i] for i in members]
            visual += self.image_features_batch([loaded[i] for i in members], visionzip, kept)
        ids = [self.tokenizer(self.prompt_text(p, len(ims)))["input_ids"] for p, ims in zip(prompts, loaded)]
        samples = [self.expand(i, v) for i, v in zip(ids, visual)]
        for s in samples:
            s.visionzip = visionzip
        return samples


def passes(images: list[list]) -> list[list[int]]:
    """The entries (indices) each pass of the vision path takes: up to ``IMAGES_PER_PASS`` images, an
    entry's images together."""
    groups, count = [], 0
    for i, ims in enumerate(images):
        if not groups or count + len(ims) > IMAGES_PER_PASS:
            groups.append([])
            count = 0
        groups[-1].append(i)
        count += len(ims)
    return groups


# ---- each family's vision path: its image processor and tower, as its own processor and model run them ----


@dataclass
class Encoded:
    """What a family's vision path made of a batch's images (samples with images only)."""

    features: list[torch.Tensor]  # (n_i, D) per image, in order
    crops: list[int]  # per sample: images/tiles the tower encoded
    grids: list[tuple[int, int, int]] | None = None  # (t, h, w) patch grid per image (dynamic resolution)
    deepstack: list[list[torch.Tensor]] | None = None  # per DeepStack level, (n_i, D) per image (Qwen3-VL)


class Towered(NamedTuple):
    """What the vision tower made of one sample's images, before the projector (LLaVA, LLaVA-OneVision):
    the part of the vision path a training run with a fixed tower may keep per record (``cache_vision``).
    Scored (VisionZip's tower part) it serves the plain path as well where ``visionzip_serves_plain``."""

    tokens: torch.Tensor  # (C, N, D) every crop's feature layer(s), as the model selects them (VisionZip: its layer)
    patches: list[int]  # crops per image
    sizes: list[list[int]] | None  # (height, width) per image: LLaVA-OneVision's AnyRes layout
    scores: torch.Tensor | None = None  # VisionZip: (C, N) each token's score in the feature layer
    keys: torch.Tensor | None = None  # VisionZip: (C, N, head dim) head-averaged keys there


def select_features(config, hidden_states) -> torch.Tensor:
    """The tower's feature layer(s) and selection strategy, as the model's ``get_image_features`` picks them."""
    layers = config.vision_feature_layer
    feats = torch.cat([hidden_states[i] for i in (layers if isinstance(layers, list) else [layers])], -1)
    return feats[:, 1:] if config.vision_feature_select_strategy == "default" else feats  # "default": no CLS


def crop_pixels(bb: Backbone, samples: list[list[Image.Image]]) -> tuple[torch.Tensor, list[int], list | None]:
    """Every crop the tower encodes (C, 3, H, W), the crops per image and the image sizes (LLaVA-OneVision).
    LLaVA: one CLIP crop per image. LLaVA-OneVision: a lone image is tiled (AnyRes: base crop + tiles),
    several get one crop each; its processor takes one entry per sample."""
    if bb.config.model_type == "llava":
        pixels = bb.image_processor([im for images in samples for im in images], return_tensors="pt")["pixel_values"]
        return pixels, [1] * len(pixels), None
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    inputs = bb.image_processor(samples, return_tensors="pt")
    side, pinpoints = bb.config.vision_config.image_size, bb.config.image_grid_pinpoints
    sizes = inputs["image_sizes"].tolist()
    alone = [len(images) == 1 for images in samples for _ in images]
    patches = [image_size_to_num_patches(s, pinpoints, side) if a else 1 for s, a in zip(sizes, alone)]
    return torch.cat([pv[:p] for pv, p in zip(inputs["pixel_values"], patches)]), patches, sizes


def per_sample(samples: list[list], patches: list[int], sizes: list | None, *per_crop: torch.Tensor) -> list[Towered]:
    """Towered per sample from tensors over all crops (tokens, then VisionZip's scores and keys); each
    sample's a copy of its own part, so that keeping it does not keep the batch's."""
    towered, first = [], 0  # the sample's first image among all
    for images in samples:
        own = slice(first, first + len(images))
        start = sum(patches[:first])  # its first crop
        parts = [t[start : start + sum(patches[own])].clone() for t in per_crop]
        towered.append(Towered(parts[0], patches[own], None if sizes is None else sizes[own], *parts[1:]))
        first += len(images)
    return towered


def _tower(bb: Backbone, samples: list[list[Image.Image]], dtype) -> list[Towered]:
    pixels, patches, sizes = crop_pixels(bb, samples)
    hidden = bb.hf.model.vision_tower(pixels.to(bb.device, dtype), output_hidden_states=True).hidden_states
    return per_sample(samples, patches, sizes, select_features(bb.config, hidden))


def _projected(bb: Backbone, towered: list[Towered], dtype) -> Encoded:
    """The projector (and LLaVA-OneVision's AnyRes packing: unpadding, newline tokens) on tower outputs."""
    projected = bb.hf.model.multi_modal_projector(torch.cat([t.tokens for t in towered]).to(bb.device, dtype))
    per_image = list(projected.split([p for t in towered for p in t.patches]))
    if bb.config.model_type == "llava":
        features = [f[0] for f in per_image]
    else:
        sizes = torch.tensor([s for t in towered for s in t.sizes], device=bb.device)
        ratio = bb.config.vision_aspect_ratio
        features, _ = bb.hf.model.pack_image_features(per_image, sizes, bb.hf.model.image_newline, ratio)
    return Encoded(list(features), [sum(t.patches) for t in towered])


def _qwen_vl(bb: Backbone, samples: list[list[Image.Image]], dtype) -> Encoded:
    """Qwen2/2.5/3-VL: each image at its own resolution (a patch grid); Qwen3-VL adds DeepStack."""
    inputs = bb.image_processor([im for images in samples for im in images], return_tensors="pt")
    out = bb.hf.model.get_image_features(
        pixel_values=inputs["pixel_values"].to(bb.device, dtype),
        image_grid_thw=inputs["image_grid_thw"].to(bb.device),
        return_dict=True,
    )
    grids = [tuple(g) for g in inputs["image_grid_thw"].tolist()]
    deepstack = [list(level) for level in getattr(out, "deepstack_features", None) or []] or None
    return Encoded(list(out.pooler_output), [len(images) for images in samples], grids, deepstack)


def _internvl(bb: Backbone, samples: list[list[Image.Image]], dtype) -> Encoded:
    """InternVL: tiles + a thumbnail per image, as its processor cuts them (it tiles by default,
    whatever the saved image-processor config says), image_seq_length tokens per tile."""
    inputs = bb.image_processor([im for images in samples for im in images], crop_to_patches=True, return_tensors="pt")
    out = bb.hf.model.get_image_features(pixel_values=inputs["pixel_values"].to(bb.device, dtype), return_dict=True)
    tiles = inputs["num_patches"].tolist()
    features = out.pooler_output.flatten(0, 1).split([n * bb.config.image_seq_length for n in tiles])
    per_image = iter(tiles)
    return Encoded(list(features), [sum(next(per_image) for _ in images) for images in samples])


TOWERED = ("llava", "llava_onevision")  # tower, then projector: ``_tower`` + ``_projected``
VISION_PATHS = {  # the others' vision path, whole
    "qwen2_vl": _qwen_vl,
    "qwen2_5_vl": _qwen_vl,
    "qwen3_vl": _qwen_vl,
    "internvl": _internvl,
}


def user_turn(text: str, n_images: int) -> dict:
    """One user message as HF processors expect it: the images first, then the text."""
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}
