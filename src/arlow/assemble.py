"""``arlow create-model``: write a ready-to-use Arlow model folder.

A model folder holds everything ``from_pretrained`` needs: ``config.json``, ``model.safetensors``,
``generation_config.json``, and the processor (``processor_config.json`` with the image and video settings,
``tokenizer.json`` / ``tokenizer_config.json``, ``chat_template.jinja``). Two ways to make one:

1. **A preset with random weights** (``--preset tiny`` for tests and demos, ``--preset small``): the built-in
   tokenizer's vocabulary, sizes from :data:`PRESETS`; ``--text-only`` writes just the ``ArlowForCausalLM`` half.
2. **From parts** (stage 2 of the recipe): ``--vision-encoder DIR`` (the ``vision_encoder/`` export of
   ``arlow pretrain``, or the ``checkpoint-N/`` folder holding it) + ``--text-model DIR`` (an ``ArlowForCausalLM``
   folder, e.g. made by ``python -m arlow.modeling.convert_llm``). The vision output width must equal the text width;
   the tokenizer (the text model's, ``--tokenizer DIR``, or the built-in one) gets the multimodal and chat special
   tokens if it lacks them, and the embeddings grow to hold them. Weights are mapped by name
   (``X`` -> ``model.visual.X``, ``model.X`` -> ``model.language_model.X``, ``lm_head.weight``) and every weight of the
   result must come from a source: nothing is left randomly initialised without an error.

Usage::

    arlow create-model runs/tiny-vlm --preset tiny
    arlow create-model runs/vlm --vision-encoder runs/pretrain-demo/checkpoint-400 --text-model runs/arlow-0.5b
"""

from __future__ import annotations

import argparse
import copy
import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, GenerationConfig

from .configuration import ArlowConfig, ArlowTextConfig, ArlowVisionConfig
from .modeling.multimodal import ArlowForConditionalGeneration
from .modeling.text import ArlowForCausalLM
from .processing import ArlowImageProcessor, ArlowProcessor, ArlowVideoProcessor, load_default_tokenizer
from .processing.tokenizer import EOS_TOKEN, MULTIMODAL_SPECIAL_TOKENS, NAMED_MULTIMODAL_TOKENS, default_chat_template
from .training.checkpoint import publish_folder

__all__ = ["PRESETS", "build_preset", "assemble", "save_model_dir", "create_model", "run"]

CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")

# Sizes of the random-weight presets. The vision output width is always set to the text width; the vocabulary is the
# tokenizer's. Processor bounds keep the token counts in proportion to the model (tiny: <= 16 tokens per image).
PRESETS: dict[str, dict] = {
    "tiny": {
        "vision": dict(depth=2, embed_dim=32, num_heads=2, deepstack_visual_indexes=[0, 1]),
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=4096),
        "model": dict(tokens_per_second=2.0),
        "image": dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16),
        "video": dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 4, fps=2.0, max_frames=8),
    },
    "small": {
        "vision": dict(depth=6, embed_dim=256, num_heads=4),
        "text": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
                     num_key_value_heads=2, max_position_embeddings=8192),
        "model": dict(tokens_per_second=2.0),
        "image": dict(min_pixels=28 * 28 * 4, max_pixels=448 * 448),
        "video": dict(min_pixels=28 * 28 * 4, max_pixels=224 * 224, fps=2.0, max_frames=16),
    },
}


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and processor


def _token_ids(tokenizer) -> dict[str, int]:
    return {tok: tokenizer.convert_tokens_to_ids(tok) for tok in (EOS_TOKEN, *CHAT_TOKENS, *MULTIMODAL_SPECIAL_TOKENS)}


def _ensure_special_tokens(tokenizer) -> list[str]:
    """Add the chat and multimodal special tokens the tokenizer lacks; returns the ones added."""
    vocab = tokenizer.get_vocab()
    missing = [tok for tok in (*CHAT_TOKENS, *MULTIMODAL_SPECIAL_TOKENS) if tok not in vocab]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.eos_token is None and EOS_TOKEN not in vocab:
        tokenizer.add_special_tokens({"eos_token": EOS_TOKEN})
        missing.append(EOS_TOKEN)
    return missing


def _processor(tokenizer, image_settings: dict, video_settings: dict) -> ArlowProcessor:
    # The VLM's placeholders are Arlow's, so its chat template must be Arlow's (a Qwen template writes <|image_pad|>).
    tokenizer.chat_template = default_chat_template()
    return ArlowProcessor(ArlowImageProcessor(**image_settings), tokenizer,
                          video_processor=ArlowVideoProcessor(**video_settings), chat_template=default_chat_template())


def _generation_config(tokenizer) -> GenerationConfig:
    """Greedy by default; a chat turn ends at ``<|im_end|>`` (or end of text); padding with end of text."""
    ids = _token_ids(tokenizer)
    eos = [ids[t] for t in ("<|im_end|>", EOS_TOKEN) if ids[t] is not None and ids[t] != tokenizer.unk_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids[EOS_TOKEN]
    return GenerationConfig(eos_token_id=eos, pad_token_id=pad, do_sample=False)


# ----------------------------------------------------------------------------------------------------------------
# (a) presets


def build_preset(name: str, *, text_only: bool = False, seed: int = 0):
    """A preset model with random weights and its processor.

    Returns ``(model, processor)``: an :class:`ArlowForConditionalGeneration` (or an :class:`ArlowForCausalLM` with
    ``text_only=True``) and an :class:`ArlowProcessor` over the built-in tokenizer.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[name]
    tokenizer = load_default_tokenizer()
    ids = _token_ids(tokenizer)
    text_config = ArlowTextConfig(vocab_size=len(tokenizer), eos_token_id=[ids["<|im_end|>"], ids[EOS_TOKEN]],
                                  **preset["text"])
    torch.manual_seed(seed)
    if text_only:
        model = ArlowForCausalLM(text_config)
    else:
        config = ArlowConfig(
            vision_config={**preset["vision"], "hidden_size": text_config.hidden_size},
            text_config=text_config,
            **{key.replace("_token", "_token_id"): ids[tok] for key, tok in NAMED_MULTIMODAL_TOKENS.items()},
            **preset["model"],
        )
        model = ArlowForConditionalGeneration(config)
    model.generation_config = _generation_config(tokenizer)
    return model.eval(), _processor(tokenizer, preset["image"], preset["video"])


# ----------------------------------------------------------------------------------------------------------------
# (b) from a vision encoder and a text model


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``model.safetensors`` or a sharded ``model.safetensors.index.json`` folder."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        state = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(str(folder / shard)))
        return state
    raise FileNotFoundError(f"{folder} has no model.safetensors (or model.safetensors.index.json)")


def _vision_dir(path: Path) -> Path:
    """The ``vision_encoder/`` export itself, or the ``checkpoint-N/`` folder that holds it."""
    if (path / "vision_encoder" / "config.json").is_file():
        return path / "vision_encoder"
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(f"{path} is neither a vision_encoder/ export (config.json + model.safetensors) nor a "
                            "checkpoint folder that contains one")


def _load_config(folder: Path, expected: str, hint: str) -> dict:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json")
    data = json.loads(config_file.read_text(encoding="utf-8"))
    model_type = data.get("model_type")
    if expected == "arlow_vision" and model_type == "arlow" and "vision_config" not in data:
        model_type = "arlow_vision"  # a standalone vision config saved by the reference fork
    if model_type != expected:
        raise ValueError(f"{folder} holds a {model_type!r} model but a {expected!r} one is needed: {hint}")
    return data


def _grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``(V, Hd) -> (rows, Hd)``; new rows are the mean of the old ones (a neutral start for new special tokens)."""
    extra = weight.float().mean(0, keepdim=True).expand(rows - weight.shape[0], -1).to(weight.dtype)
    return torch.cat([weight, extra])


def assemble(vision_encoder: str | Path, text_model: str | Path, tokenizer: str | Path | None = None):
    """Build an :class:`ArlowForConditionalGeneration` from an exported encoder and an ``ArlowForCausalLM`` folder.

    Returns ``(model, processor)``. Raises ``ValueError`` when the widths differ, a folder holds the wrong kind of
    model, or any weight of the result has no source (or a source has a weight the model does not use).
    """
    vision_dir = _vision_dir(Path(vision_encoder))
    text_dir = Path(text_model)
    vision_data = _load_config(vision_dir, "arlow_vision", "give the vision_encoder/ folder written by "
                                                          "`arlow pretrain` / `arlow export`")
    text_data = _load_config(text_dir, "arlow_text", "give an ArlowForCausalLM folder (convert a Qwen/Llama "
                                                    "checkpoint with `python -m arlow.modeling.convert_llm`)")
    vision_data["model_type"] = "arlow_vision"
    vision_config = ArlowVisionConfig.from_dict(vision_data)
    text_config = ArlowTextConfig.from_dict(text_data)
    if vision_config.hidden_size != text_config.hidden_size:
        raise ValueError(
            f"the vision encoder's output width (vision hidden_size = {vision_config.hidden_size}) differs from the "
            f"text model's hidden_size ({text_config.hidden_size}): merged vision tokens replace text embeddings, so "
            "they must be equal. Pretrain (or export) the encoder with vision_config.hidden_size = "
            f"{text_config.hidden_size}, or pick a text model of width {vision_config.hidden_size}."
        )

    # Tokenizer: --tokenizer, else the text model's own, else the built-in one.
    if tokenizer is not None:
        tok = AutoTokenizer.from_pretrained(str(tokenizer))
    elif (text_dir / "tokenizer.json").is_file() or (text_dir / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(text_dir))
    else:
        warnings.warn(f"{text_dir} has no tokenizer; using Arlow's built-in tokenizer ({len(load_default_tokenizer())}"
                      " ids). Pass --tokenizer to choose the one the text model was trained with.", stacklevel=2)
        tok = load_default_tokenizer()
    added = _ensure_special_tokens(tok)
    if tok.padding_side != "left":
        tok.padding_side = "left"  # batched generation needs left padding
    vocab = max(text_config.vocab_size, len(tok))
    if added:
        warnings.warn(f"the tokenizer lacked the special tokens {added}; they were added (ids "
                      f"{[tok.convert_tokens_to_ids(t) for t in added]}) and their embeddings start as the mean "
                      "embedding: train them (stage 2) before relying on them.", stacklevel=2)

    state = {f"model.visual.{k}": v for k, v in _read_weights(vision_dir).items()}
    text_state = _read_weights(text_dir)
    tied = bool(text_config.tie_word_embeddings)
    for key, value in text_state.items():
        if key.startswith("model."):
            state["model.language_model." + key[len("model."):]] = value
        elif key == "lm_head.weight":
            state[key] = value
        else:
            raise ValueError(f"{text_dir}: weight {key!r} is not an ArlowForCausalLM weight (expected model.* and "
                             "lm_head.weight)")
    embed_key = "model.language_model.embed_tokens.weight"
    if tied:
        if embed_key not in state:
            raise ValueError(f"{text_dir} has tied embeddings but no model.embed_tokens.weight")
        state.pop("lm_head.weight", None)
    if vocab > text_config.vocab_size:
        warnings.warn(f"resizing the text embeddings from {text_config.vocab_size} to {vocab} rows for the added "
                      "tokens", stacklevel=2)
        for key in (embed_key, "lm_head.weight"):
            if key in state:
                state[key] = _grow_rows(state[key], vocab)
    if tied:
        state["lm_head.weight"] = state[embed_key]

    text_config = copy.deepcopy(text_config)
    text_config.vocab_size = vocab
    ids = _token_ids(tok)
    config = ArlowConfig(
        vision_config=vision_config,
        text_config=text_config,
        tie_word_embeddings=tied,
        **{key.replace("_token", "_token_id"): ids[t] for key, t in NAMED_MULTIMODAL_TOKENS.items()},
    )
    model = ArlowForConditionalGeneration(config)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"the source weights do not fit the assembled model: {err}") from None
    if missing or unexpected:
        raise ValueError(
            f"assembling {vision_dir} + {text_dir} left {len(missing)} weights without a source "
            f"{missing[:8]} and {len(unexpected)} source weights unused {unexpected[:8]}; nothing is re-initialised "
            "silently. Check that the folders hold an ArlowVLVisionModel export and an ArlowForCausalLM."
        )
    model.generation_config = _generation_config(tok)

    image_settings, video_settings = {}, {}
    for folder, settings, cls in ((vision_dir.parent / "image_processor", image_settings, ArlowImageProcessor),
                                  (vision_dir.parent / "video_processor", video_settings, ArlowVideoProcessor)):
        if folder.is_dir():
            saved = cls.from_pretrained(str(folder))
            keys = ("min_pixels", "max_pixels") if cls is ArlowImageProcessor else (
                "min_pixels", "max_pixels", "num_frames", "fps", "max_frames")
            settings.update({k: getattr(saved, k) for k in keys})
    patching = dict(patch_size=vision_config.patch_size, temporal_patch_size=vision_config.temporal_patch_size,
                    merge_size=vision_config.spatial_merge_size)
    processor = _processor(tok, {**image_settings, **patching}, {**video_settings, **patching})
    return model.eval(), processor


# ----------------------------------------------------------------------------------------------------------------
# Writing the folder


def save_model_dir(model, processor: ArlowProcessor, output: str | Path, *, overwrite: bool = False,
                   dtype: torch.dtype | None = None) -> Path:
    """Write model + processor + generation config to ``output`` via a temporary folder renamed into place."""
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{output} exists and is not empty; pass --overwrite to replace it")
    if dtype is not None:
        model = model.to(dtype)

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)

    return publish_folder(output, write)


def create_model(output: str | Path, *, preset: str | None = None, vision_encoder: str | Path | None = None,
                 text_model: str | Path | None = None, tokenizer: str | Path | None = None, text_only: bool = False,
                 dtype: torch.dtype | None = None, seed: int = 0, overwrite: bool = False) -> Path:
    """Python form of ``arlow create-model``; returns the folder written."""
    from_parts = vision_encoder is not None or text_model is not None
    if (preset is None) == (not from_parts):
        raise ValueError("give either --preset NAME, or --vision-encoder DIR together with --text-model DIR")
    if from_parts:
        if vision_encoder is None or text_model is None:
            raise ValueError("--vision-encoder and --text-model go together: the VLM needs both parts")
        if text_only:
            raise ValueError("--text-only applies to presets; a text model folder already is text-only")
        model, processor = assemble(vision_encoder, text_model, tokenizer)
    else:
        if tokenizer is not None:
            raise ValueError("--tokenizer applies to --text-model; presets use the built-in tokenizer")
        model, processor = build_preset(preset, text_only=text_only, seed=seed)
    return save_model_dir(model, processor, output, overwrite=overwrite, dtype=dtype)


def run(args: argparse.Namespace) -> int:
    try:
        out = create_model(
            args.output, preset=args.preset, vision_encoder=args.vision_encoder, text_model=args.text_model,
            tokenizer=args.tokenizer, text_only=args.text_only,
            dtype=getattr(torch, args.dtype) if args.dtype else None, seed=args.seed, overwrite=args.overwrite,
        )
    except FileExistsError as err:
        raise ValueError(str(err)) from None
    kind = "ArlowForCausalLM" if args.text_only else "ArlowForConditionalGeneration"
    print(f"wrote {kind} + processor to {out}")
    return 0
