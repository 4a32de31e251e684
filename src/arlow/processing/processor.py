"""``ArlowProcessor``: text + images + videos -> the exact inputs of the Arlow model.

It runs the image processor, the video processor and the tokenizer, and expands every placeholder into as many
tokens as the vision encoder will produce for that item:

    "<image>"  or  "<|vision_start|><image><|vision_end|>"
        ->  "<|vision_start|>" + "<image>" * (t * h * w / merge_size**2) + "<|vision_end|>"

(``(t, h, w)`` is the item's row of ``image_grid_thw`` / ``video_grid_thw``; videos likewise with ``<video>``).
Placeholders and media are matched in order, across the whole batch. A count mismatch raises a ``ValueError``
that gives both counts; so does truncation that would cut a run of placeholders.

The processor's attributes are transformers' standard ones, as Qwen2-VL's: ``image_processor``, ``tokenizer``,
``video_processor`` (and ``chat_template``). ``save_pretrained`` writes the image and video processor settings into
``processor_config.json`` (keys ``image_processor`` and ``video_processor``) and the tokenizer into its own files;
``from_pretrained`` / ``AutoProcessor`` read them back. transformers builds a video processor through
``AutoVideoProcessor`` and checks it against its own base class, both of which exist only with torchvision;
:class:`ArlowVideoProcessor` needs no torchvision, so this class checks and loads that one attribute itself
(``check_argument_for_proper_class``, ``_load_video_processor``). Folders saved before the video processor became
an attribute hold its settings as ``video_config``; they still load.
"""

import os
import re

import numpy as np
import torch
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import (
    MultiModalData,
    ProcessingKwargs,
    ProcessorMixin,
    TextKwargs,
)

from transformers.video_utils import VideoInput
from typing_extensions import Unpack

from .._compat import UNMARKED, offsets_in_prompt
from .image import ArlowImageProcessor, ArlowImageProcessorKwargs
from .tokenizer import NAMED_MULTIMODAL_TOKENS, default_chat_template, load_default_tokenizer
from .video import VIDEO_CONFIG_NAME, ArlowVideoProcessor, ArlowVideosKwargs, flatten_videos

__all__ = ["ArlowProcessor", "ArlowProcessorKwargs", "flatten_images"]


class ArlowProcessorKwargs(ProcessingKwargs, total=False):
    images_kwargs: ArlowImageProcessorKwargs
    videos_kwargs: ArlowVideosKwargs
    # transformers 5.17-5.19 read ``_defaults`` unconditionally, and a TypedDict does not inherit it; no defaults.
    _defaults = {}


def _is_single_image(x) -> bool:
    if isinstance(x, (Image.Image, str, bytes, bytearray)) or hasattr(x, "__fspath__"):
        return True
    return isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim in (2, 3)


def flatten_images(images) -> list:
    """An image or a (nested) list of images -> a flat list. A 4-D array is a batch of images."""
    if images is None:
        return []
    if _is_single_image(images):
        return [images]
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if images.ndim == 4:
            return list(images)
        raise ValueError(f"an image array must be (H, W), (H, W, C), (C, H, W) or a 4-D batch; got shape "
                         f"{tuple(images.shape)}")
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in flatten_images(item)]
    raise TypeError(f"cannot read an image from {type(images).__name__}")


def _per_sample(media, flatten, batch_size: int) -> list[int] | None:
    """Item counts per sample when ``media`` is nested one list per sample, else ``None``."""
    if isinstance(media, (list, tuple)) and len(media) == batch_size and batch_size > 1 \
            and all(item is None or isinstance(item, (list, tuple)) for item in media):
        return [len(flatten(item)) if item is not None else 0 for item in media]
    return None


class ArlowProcessor(ProcessorMixin):
    r"""Processor of Arlow: :class:`ArlowImageProcessor` + tokenizer + :class:`ArlowVideoProcessor` + chat template.

    Args:
        image_processor: an :class:`ArlowImageProcessor` (default settings if omitted).
        tokenizer: a tokenizer holding ``<image>``, ``<video>``, ``<|vision_start|>`` and ``<|vision_end|>``
            (the built-in :func:`~arlow.processing.tokenizer.load_default_tokenizer` if omitted).
        video_processor: an :class:`ArlowVideoProcessor` or its settings dict (defaults if omitted).
        chat_template: Jinja template; defaults to the tokenizer's, else Arlow's ChatML template.

    ``processor(text=..., images=..., videos=...)`` returns ``input_ids``, ``attention_mask`` and, for the media
    given, ``pixel_values (N, 1176)``, ``image_grid_thw (n_images, 3)``, ``pixel_values_videos (M, 1176)``,
    ``video_grid_thw (n_videos, 3)`` and ``second_per_grid_ts (n_videos,)``. Options go flat
    (``padding=True, return_tensors="pt", max_pixels=..., fps=2``) or per modality (``images_kwargs={...}``); a
    flat option that both the image and the video processor know (``min_pixels``, ``max_pixels``) applies to both.
    """

    valid_processor_kwargs = ArlowProcessorKwargs
    return_mm_token_type_ids = False
    _in_chat_template = False  # True while apply_chat_template runs (see offsets_in_prompt)

    def __init__(self, image_processor=None, tokenizer=None, video_processor=None, chat_template=None):
        image_processor = image_processor if image_processor is not None else ArlowImageProcessor()
        tokenizer = tokenizer if tokenizer is not None else load_default_tokenizer()
        if video_processor is None:
            video_processor = ArlowVideoProcessor()
        elif isinstance(video_processor, dict):
            video_processor = ArlowVideoProcessor(**video_processor)
        for name in ("patch_size", "temporal_patch_size", "merge_size"):
            if isinstance(video_processor, ArlowVideoProcessor) \
                    and getattr(image_processor, name) != getattr(video_processor, name):
                raise ValueError(f"image and video processors disagree on {name} ({getattr(image_processor, name)} "
                                 f"vs {getattr(video_processor, name)}); both must match the vision encoder")
        for attr, default in NAMED_MULTIMODAL_TOKENS.items():
            token = getattr(tokenizer, attr, None) or default
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == tokenizer.unk_token_id or token not in tokenizer.get_vocab():
                raise ValueError(f"the tokenizer has no {token} token; add Arlow's special tokens "
                                 f"{list(NAMED_MULTIMODAL_TOKENS.values())} (tokenizer.add_special_tokens) or use "
                                 "arlow.processing.load_default_tokenizer()")
            setattr(self, attr, token)
            setattr(self, f"{attr}_id", token_id)
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None) or default_chat_template()
        super().__init__(image_processor, tokenizer, video_processor, chat_template=chat_template)
        start, end = re.escape(self.vision_start_token), re.escape(self.vision_end_token)
        self._placeholder_re = re.compile(
            f"{UNMARKED}(?P<image>(?:{start})?{re.escape(self.image_token)}(?:{end})?)"
            f"|{UNMARKED}(?P<video>(?:{start})?{re.escape(self.video_token)}(?:{end})?)"
        )

    @classmethod
    def from_default(cls, **video_settings) -> "ArlowProcessor":
        """Default image/video settings, the built-in tokenizer and chat template; nothing is downloaded."""
        return cls(ArlowImageProcessor(), load_default_tokenizer(), ArlowVideoProcessor(**video_settings))

    # -- the video processor attribute (transformers' checks and loaders for it need torchvision) ---------------

    def check_argument_for_proper_class(self, argument_name, argument):
        if "video_processor" in argument_name:
            if not isinstance(argument, ArlowVideoProcessor):
                raise TypeError(f"Received a {type(argument).__name__} for argument {argument_name}, but an "
                                "ArlowVideoProcessor (or its settings dict) was expected.")
            return ArlowVideoProcessor
        return super().check_argument_for_proper_class(argument_name, argument)

    @staticmethod
    def _load_video_processor(pretrained_model_name_or_path, processor_dict: dict,
                              kwargs: dict) -> ArlowVideoProcessor:
        """The video processor saved with a processor: ``processor_config.json``'s ``video_processor`` entry (or
        the earlier ``video_config``), else a ``video_preprocessor_config.json`` beside it, else the defaults.
        Video settings among ``kwargs`` (``from_pretrained(path, do_normalize=False)``) override the saved ones, as
        transformers applies them to every sub-processor that has them. The legacy entry is removed from
        ``processor_dict`` (the constructor gets the built processor)."""
        overrides = {key: value for key, value in kwargs.items() if key in ArlowVideoProcessor.setting_names()}
        saved = processor_dict.get("video_processor")
        legacy = processor_dict.pop("video_config", None)
        settings = saved if isinstance(saved, dict) else legacy
        if isinstance(settings, dict):
            return ArlowVideoProcessor.from_dict(settings, **overrides)
        path = str(pretrained_model_name_or_path)
        if os.path.isfile(os.path.join(path, VIDEO_CONFIG_NAME)):
            return ArlowVideoProcessor.from_pretrained(path, **overrides)
        return ArlowVideoProcessor(**overrides)

    @classmethod
    def _resolve_subprocessors(cls, pretrained_model_name_or_path, processor_dict, **kwargs):
        """The loading hook of newer transformers (5.25 has it, 5.17 has ``_get_arguments_from_pretrained``): an
        entry of ``processor_dict`` that is neither a dict nor ``None`` is taken as the built sub-processor; put the
        video processor there (the caller's, taken out of ``kwargs`` so that the parts loaded before it do not
        receive it as an option, or the saved one)."""
        video_processor = kwargs.pop("video_processor", None)
        if video_processor is None:
            video_processor = cls._load_video_processor(pretrained_model_name_or_path, processor_dict, kwargs)
        processor_dict["video_processor"] = video_processor
        return super()._resolve_subprocessors(pretrained_model_name_or_path, processor_dict, **kwargs)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """The loading hook of older transformers (5.17; 5.25 uses ``_resolve_subprocessors``): the positional
        sub-processors (image processor, tokenizer, video processor), loaded as ``ProcessorMixin`` does except the
        video processor (see the module docstring)."""
        from transformers.models.auto.image_processing_auto import AutoImageProcessor

        processor_dict = processor_dict if processor_dict is not None else {}
        subfolder = kwargs.pop("subfolder", "")
        # Parts the caller passes replace these later (from_args_and_dict); they are no loading options.
        given = {name: kwargs.pop(name, None) for name in cls.get_attributes()}
        if given["image_processor"] is None:
            given["image_processor"] = AutoImageProcessor.from_pretrained(pretrained_model_name_or_path,
                                                                          subfolder=subfolder, **kwargs)
        if given["tokenizer"] is None:
            given["tokenizer"] = cls._load_tokenizer_from_pretrained("tokenizer", pretrained_model_name_or_path,
                                                                     subfolder=subfolder, **kwargs)
        if given["video_processor"] is None:
            given["video_processor"] = cls._load_video_processor(pretrained_model_name_or_path, processor_dict,
                                                                 kwargs)
        return [given["image_processor"], given["tokenizer"], given["video_processor"]]

    @property
    def merge_length(self) -> int:
        return self.image_processor.merge_size**2

    # -- the main call -----------------------------------------------------------------------------------------

    def __call__(self, images: ImageInput | None = None, text: str | list[str] | None = None,
                 videos: VideoInput | None = None, **kwargs: Unpack[ArlowProcessorKwargs]) -> BatchFeature:
        """Process a prompt or a batch of prompts with their images and videos (see the class docstring)."""
        if images is None and text is None and videos is None:
            raise ValueError("ArlowProcessor needs text, images or videos")
        if isinstance(images, str) and not images:
            raise ValueError("images='' is empty: to process a prompt pass it as text=... (the first positional "
                             "argument of the processor is images)")
        if text is not None and not isinstance(text, str) and len(text) == 0:
            raise ValueError("text=[] holds no prompt: give a string or a non-empty list of strings")
        merged = self._merge_kwargs(ArlowProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_kwargs, images_kwargs, videos_kwargs = (merged[k] for k in ("text_kwargs", "images_kwargs",
                                                                         "videos_kwargs"))
        return_tensors = text_kwargs.pop("return_tensors", None)
        images_kwargs.pop("return_tensors", None)
        videos_kwargs.pop("return_tensors", None)
        return_mm = text_kwargs.pop("return_mm_token_type_ids", merged.get("return_mm_token_type_ids", False))
        return_offsets = text_kwargs.pop("return_text_replacement_offsets",
                                         merged.get("return_text_replacement_offsets", False))

        texts = None
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not all(isinstance(t, str) for t in texts):
                raise ValueError("text must be a string or a list of strings")
        flat_images, flat_videos = flatten_images(images), flatten_videos(videos)
        if texts is not None:
            self._check_counts(texts, images, flat_images, videos, flat_videos)

        data, image_tokens, video_tokens = {}, [], []
        if flat_images:
            image_inputs = self.image_processor(flat_images, **images_kwargs)
            data.update(image_inputs)
            image_tokens = self._tokens_per_item(image_inputs["image_grid_thw"],
                                                 images_kwargs.get("merge_size") or self.image_processor.merge_size)
        if flat_videos:
            video_inputs = self.video_processor(flat_videos, **videos_kwargs)
            data.update(video_inputs)
            video_tokens = self._tokens_per_item(video_inputs["video_grid_thw"],
                                                 videos_kwargs.get("merge_size") or self.video_processor.merge_size)
        if not videos_kwargs.get("return_metadata"):
            data.pop("video_metadata", None)

        if texts is not None:
            expanded, offsets = self._expand(texts, image_tokens, video_tokens)
            text_inputs = self.tokenizer(expanded, **text_kwargs)
            self._check_runs_survived(expanded, text_inputs["input_ids"], text_kwargs)
            if return_mm:
                text_inputs["mm_token_type_ids"] = self.create_mm_token_type_ids(text_inputs["input_ids"])
            if return_offsets:
                text_inputs["text_replacement_offsets"] = offsets
            elif self._in_chat_template and "offset_mapping" in text_inputs:
                # The caller matches assistant spans in the rendered prompt (transformers 5.17-5.18).
                text_inputs["offset_mapping"] = offsets_in_prompt(text_inputs["offset_mapping"], offsets)
            data = {**text_inputs, **data}
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=self.skip_tensor_conversion)

    @staticmethod
    def _tokens_per_item(grid_thw, merge_size: int) -> list[int]:
        """Encoder output tokens of each item: ``t * h * w / merge_size**2``."""
        grids = np.asarray(grid_thw).reshape(-1, 3)
        return [int(np.prod(g)) // merge_size**2 for g in grids]

    def _check_counts(self, texts, images, flat_images, videos, flat_videos) -> None:
        for kind, media, flat, flatten in (("image", images, flat_images, flatten_images),
                                           ("video", videos, flat_videos, flatten_videos)):
            found = [sum(1 for m in self._placeholder_re.finditer(t) if m.lastgroup == kind) for t in texts]
            token = getattr(self, f"{kind}_token")
            if sum(found) != len(flat):
                raise ValueError(
                    f"found {sum(found)} {kind} placeholder(s) {token} in the text (per prompt: {found}) but "
                    f"{len(flat)} {kind}(s) were given; write one {token} (or "
                    f"{self.vision_start_token}{token}{self.vision_end_token}) per {kind}, in order"
                )
            per_sample = _per_sample(media, flatten, len(texts))
            if per_sample is not None and per_sample != found:
                raise ValueError(f"{kind}s per prompt {per_sample} do not match the {token} placeholders per prompt "
                                 f"{found}")

    def _expand(self, texts: list[str], image_tokens: list[int], video_tokens: list[int]):
        """Replace each placeholder by its full run; also return the replacement offsets (for assistant masks)."""
        counts = {"image": iter(image_tokens), "video": iter(video_tokens)}
        tokens = {"image": self.image_token, "video": self.video_token}
        expanded, offsets = [], []
        for text in texts:
            pieces, spans, last, shift = [], [], 0, 0
            for match in self._placeholder_re.finditer(text):
                kind = match.lastgroup
                run = self.vision_start_token + tokens[kind] * next(counts[kind]) + self.vision_end_token
                start, end = match.span()
                pieces += [text[last:start], run]
                spans.append({"type": kind, "span": (start, end), "new_span": (start + shift, start + shift + len(run)),
                              "text": match.group(), "replacement": run})
                shift += len(run) - (end - start)
                last = end
            pieces.append(text[last:])
            expanded.append("".join(pieces))
            offsets.append(spans)
        return expanded, offsets

    def _check_runs_survived(self, expanded: list[str], input_ids, text_kwargs) -> None:
        """Every placeholder run must reach the model whole (truncation may cut text, never a run)."""
        names = ("image_token", "video_token", "vision_start_token", "vision_end_token")
        for i, (text, ids) in enumerate(zip(expanded, input_ids)):
            ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
            for name in names:
                token, token_id = getattr(self, name), getattr(self, f"{name}_id")
                wanted = len(re.findall(UNMARKED + re.escape(token), text))
                got = ids.count(token_id)
                if got != wanted:
                    raise ValueError(
                        f"prompt {i} needs {wanted} {token} tokens but only {got} are left after tokenization "
                        f"(truncation={text_kwargs.get('truncation')}, max_length={text_kwargs.get('max_length')}). "
                        "Truncation must not cut a run of vision placeholders: raise max_length, shorten the text, "
                        "or lower max_pixels / the number of frames"
                    )

    # -- chat, decoding, bookkeeping ---------------------------------------------------------------------------

    def apply_chat_template(self, conversation, chat_template=None, processor_kwargs=None, **kwargs):
        """transformers' ``apply_chat_template``, with processing options (``padding``, ``fps``, ``num_frames``,
        ``max_pixels`` ...) also accepted as plain keyword arguments."""
        processing_keys = set(TextKwargs.__annotations__) | set(ArlowImageProcessorKwargs.__annotations__) \
            | set(ArlowVideosKwargs.__annotations__) | {"return_mm_token_type_ids"}
        processing_keys -= {"return_tensors"}  # apply_chat_template's own argument
        moved = {key: kwargs.pop(key) for key in list(kwargs) if key in processing_keys}
        processor_kwargs = {**moved, **(processor_kwargs or {})}
        _check_conversation(conversation)
        self._in_chat_template = True
        try:
            return super().apply_chat_template(conversation, chat_template=chat_template,
                                               processor_kwargs=processor_kwargs, **kwargs)
        finally:
            self._in_chat_template = False

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        """Decode generated ids: a batch ``(B, L)`` -> list of strings, one sequence ``(L,)`` -> a string."""
        ndim = getattr(generated_outputs, "ndim", None)
        if ndim is None:
            ndim = 2 if generated_outputs and isinstance(generated_outputs[0], (list, tuple)) else 1
        decode = self.tokenizer.batch_decode if ndim == 2 else self.tokenizer.decode
        return decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        names = self.tokenizer.model_input_names + self.image_processor.model_input_names \
            + self.video_processor.model_input_names
        return list(dict.fromkeys(names))

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs) -> MultiModalData:
        """Placeholder counts for images of ``(height, width)`` and videos of ``(frames, height, width)``."""
        merged = self._merge_kwargs(ArlowProcessorKwargs, **kwargs)
        data = {}
        if image_sizes is not None:
            patches = [self.image_processor.get_number_of_image_patches(h, w, merged["images_kwargs"])
                       for h, w in image_sizes]
            data.update(num_image_patches=patches, num_image_tokens=[n // self.merge_length for n in patches])
        if video_sizes is not None:
            patches = [self.video_processor.get_number_of_video_patches(t, h, w, merged["videos_kwargs"])
                       for t, h, w in video_sizes]
            data["num_video_tokens"] = [n // self.merge_length for n in patches]
        return MultiModalData(**data)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["video_processor"] = self.video_processor.to_dict()  # transformers serializes only its own classes
        return out

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        # A call with truncation/padding leaves them set on the Rust tokenizer, which would then be written into
        # tokenizer.json and silently truncate every prompt after reloading.
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            backend.no_truncation()
            backend.no_padding()
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)


def _check_conversation(conversation) -> None:
    """Refuse an empty conversation (or batch) and content blocks Arlow cannot take, before transformers would."""
    if isinstance(conversation, (list, tuple)) and len(conversation) == 0:
        raise ValueError("the conversation is empty: give a list of messages such as "
                         "[{'role': 'user', 'content': [{'type': 'text', 'text': 'Hi'}]}]")
    batch = conversation if conversation and isinstance(conversation[0], (list, tuple)) else [conversation]
    for messages in batch:
        if isinstance(messages, (list, tuple)) and len(messages) == 0:
            raise ValueError("a conversation of the batch is empty: every conversation needs at least one message")
        for message in messages if isinstance(messages, (list, tuple)) else []:
            content = message.get("content") if isinstance(message, dict) else None
            for block in content if isinstance(content, list) else []:
                kind = block.get("type") if isinstance(block, dict) else None
                if kind in ("audio", "input_audio"):
                    raise ValueError("audio content is not supported: Arlow models take text, images and videos")
