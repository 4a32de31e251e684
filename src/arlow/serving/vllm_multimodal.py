"""``ArlowForConditionalGeneration`` as a vLLM model: images, videos, M-RoPE positions and DeepStack.

How a request flows (compare vLLM's Qwen3-VL, which carries DeepStack the same way):

1. **Processing** (:class:`ArlowMultiModalProcessor`): Arlow's own :class:`~arlow.processing.ArlowProcessor` turns
   the images/videos into ``pixel_values (N, C*Tp*P*P)`` + ``image_grid_thw (n, 3)`` (videos likewise). In the
   tokenized prompt each ``<image>`` (``<video>``) token becomes a run of ``t*h*w / s**2`` of them - the run only; the
   ``<|vision_start|>``/``<|vision_end|>`` around it come from the prompt, as Arlow's chat template writes them.
2. **Encoding** (:meth:`ArlowForConditionalGeneration.embed_multimodal`): Arlow's vision tower
   (:class:`~arlow.modeling.vision.ArlowVLVisionModel`, the same module as in transformers) encodes the items; each
   item's output is ``(tokens, Hd * (1 + L))``: its merged tokens followed by its ``L`` DeepStack levels, side by
   side, so that vLLM's encoder cache and chunked prefill keep them together.
3. **Embedding** (:meth:`~ArlowForConditionalGeneration.embed_input_ids`): the first ``Hd`` columns replace the
   placeholder embeddings; the DeepStack columns are scattered into ``(L, T, Hd)`` rows (zero at text tokens) that
   wait for the step's forward pass.
4. **Decoding** (:meth:`~ArlowForConditionalGeneration.forward`): level ``k`` is added after text layer
   ``config.deepstack_text_layers[k]`` (levels sharing a layer summed, scaled by ``sigmoid(visual_gates[l])`` and
   skipped before ``gated_cross_attention_start_layer`` when gates are on), exactly as ``ArlowTextModel`` does.
   Positions are the ``(3, T)`` (t, h, w) M-RoPE ids of :func:`arlow.modeling.rope.get_rope_index`, computed once per
   prompt by :meth:`~ArlowForConditionalGeneration.get_mrope_input_positions`; vLLM continues them with the
   returned delta while decoding, as ``rope_deltas`` do in ``generate()``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from functools import partial

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMRoPE, SupportsMultiModal
from vllm.model_executor.models.utils import maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)

from ..configuration import ArlowConfig
from ..modeling.rope import get_rope_index
from ..modeling.vision import ArlowVLVisionModel
from ..processing import ArlowProcessor
from ..processing.video import ASSUMED_FPS
from .vllm_text import ArlowForCausalLM, load_arlow_weights

__all__ = ["ArlowProcessingInfo", "ArlowDummyInputsBuilder", "ArlowMultiModalProcessor",
           "ArlowForConditionalGeneration"]

_MODALITIES = ("image", "video")
# Frames assumed for the largest video when the video processor sets no bound (num_frames/max_frames both None).
_FALLBACK_MAX_FRAMES = 64


# ----------------------------------------------------------------------------------------------------------------
# Processing: prompt + media -> token runs and tensors


class ArlowDataParser(MultiModalDataParser):
    """vLLM's parser, keeping each video's metadata (its frame rate) with the frames - also through vLLM's
    processing cache, which re-parses items. Frames given without metadata get an empty one."""

    def _get_video_with_metadata(self, video):
        frames, metadata = super()._get_video_with_metadata(video)
        return frames, ({} if metadata is None else metadata)


class ArlowProcessingInfo(BaseProcessingInfo):
    """What vLLM needs to know about Arlow's processor: limits and the largest item of each modality."""

    def get_data_parser(self) -> MultiModalDataParser:
        return ArlowDataParser(video_needs_metadata=True, expected_hidden_size=self._get_expected_hidden_size(),
                               allow_missing_mm_embeddings=self.allow_missing_mm_embeddings)

    def get_hf_config(self) -> ArlowConfig:
        return self.ctx.get_hf_config(ArlowConfig)

    def get_hf_processor(self, **kwargs: object) -> ArlowProcessor:
        return self.ctx.get_hf_processor(ArlowProcessor, **kwargs)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None, "video": None}

    def _token_side(self) -> int:
        """Pixels per merged token along one side: ``patch_size * merge_size`` (28)."""
        image = self.get_hf_processor().image_processor
        return image.patch_size * image.merge_size

    def largest_image(self) -> tuple[int, int]:
        """``(width, height)`` of a square image at the image processor's ``max_pixels``."""
        unit = self._token_side()
        side = max(1, math.isqrt(self.get_hf_processor().image_processor.max_pixels) // unit) * unit
        return side, side

    def largest_video(self) -> tuple[int, int, int]:
        """``(frames, width, height)`` of the largest video the video processor keeps."""
        video = self.get_hf_processor().video_processor
        frames = video.num_frames or video.max_frames or _FALLBACK_MAX_FRAMES
        side = max(1, math.isqrt(video.max_pixels) // self._token_side()) * self._token_side()
        return frames, side, side

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        unit = self._token_side()
        width, height = self.largest_image()
        frames, v_width, v_height = self.largest_video()
        temporal = self.get_hf_processor().video_processor.temporal_patch_size
        return {"image": (width // unit) * (height // unit),
                "video": math.ceil(frames / temporal) * (v_width // unit) * (v_height // unit)}


class ArlowDummyInputsBuilder(BaseDummyInputsBuilder[ArlowProcessingInfo]):
    """The largest images and videos, for vLLM's memory profiling."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        processor = self.info.get_hf_processor()
        return "".join(f"{processor.vision_start_token}{getattr(processor, f'{kind}_token')}"
                       f"{processor.vision_end_token}" * mm_counts.get(kind, 0) for kind in _MODALITIES)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options) -> dict:
        width, height = self.info.largest_image()
        frames, v_width, v_height = self.info.largest_video()
        # At the rate the processor samples by (if it does), every dummy frame is kept.
        rate = float(self.info.get_hf_processor().video_processor.fps or ASSUMED_FPS)
        return {
            "image": self._get_dummy_images(width=width, height=height, num_images=mm_counts.get("image", 0),
                                            overrides=mm_options.get("image")),
            "video": [(video, {"fps": rate}) for video in self._get_dummy_videos(
                width=v_width, height=v_height, num_frames=frames, num_videos=mm_counts.get("video", 0),
                overrides=mm_options.get("video"))],
        }


def _field_config(hf_inputs: Mapping[str, torch.Tensor]) -> dict[str, MultiModalFieldConfig]:
    """Patch rows split per item by their grid (``t*h*w`` rows each); one grid row per item."""
    image_rows = hf_inputs.get("image_grid_thw", torch.empty((0, 3))).prod(-1)
    video_rows = hf_inputs.get("video_grid_thw", torch.empty((0, 3))).prod(-1)
    return dict(
        pixel_values=MultiModalFieldConfig.flat_from_sizes("image", image_rows),
        image_grid_thw=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        pixel_values_videos=MultiModalFieldConfig.flat_from_sizes("video", video_rows),
        video_grid_thw=MultiModalFieldConfig.batched("video", keep_on_cpu=True),
        second_per_grid_ts=MultiModalFieldConfig.batched("video", keep_on_cpu=True),
    )


def video_metadata(frames, metadata: Mapping[str, object] | None) -> dict | None:
    """The ``video_metadata`` entry Arlow's video processor needs for frames vLLM hands over: their frame rate.

    ``metadata`` is what came with the frames - the user's ``(frames, {"fps": ...})`` or vLLM's video loader's
    ``{"fps", "total_num_frames", ...}``. When the loader already kept only some of the source's frames (evenly),
    the rate of the kept frames is ``fps * kept / total``; Arlow's processor then samples from them by its own rule.
    """
    if not metadata or not metadata.get("fps"):
        return None
    fps = float(metadata["fps"])
    total = metadata.get("total_num_frames")
    if total and int(total) != len(frames):
        fps *= len(frames) / int(total)
    return {"fps": fps}


class ArlowMultiModalProcessor(BaseMultiModalProcessor[ArlowProcessingInfo]):
    """Media through :class:`ArlowProcessor`; each ``<image>``/``<video>`` token of the prompt becomes its run."""

    def _get_hf_mm_inputs(self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]):
        """Videos arrive as ``(frames, metadata)`` (:class:`ArlowDataParser`): frames to the processor, their frame
        rates as its ``video_metadata``."""
        inputs = super()._get_hf_mm_inputs(mm_items, hf_kwargs)
        videos = inputs.hf_data.get("videos")
        if videos:
            frames = [v[0] if isinstance(v, tuple) else v for v in videos]
            rates = [video_metadata(f, v[1] if isinstance(v, tuple) else None) for f, v in zip(frames, videos)]
            # With the data, not the options: vLLM also builds (and caches) the processor from the options.
            inputs = inputs._replace(hf_data={**inputs.hf_data, "videos": frames, "video_metadata": rates})
        return inputs

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:
        return _field_config(hf_inputs)

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()
        merge = config.vision_config.spatial_merge_size**2

        def run(item_idx: int, modality: str, token_id: int) -> list[int]:
            grid = out_mm_kwargs[modality][item_idx][f"{modality}_grid_thw"].data
            return [token_id] * (int(grid.prod()) // merge)

        return [
            PromptReplacement(modality=kind, target=[token_id], replacement=partial(run, modality=kind,
                                                                                    token_id=token_id))
            for kind, token_id in (("image", config.image_token_id), ("video", config.video_token_id))
        ]


# ----------------------------------------------------------------------------------------------------------------
# The model


def mrope_positions(input_tokens: Sequence[int], mm_features: Sequence[MultiModalFeatureSpec],
                    config: ArlowConfig) -> tuple[torch.Tensor, int]:
    """``(3, S)`` M-RoPE ids of one prompt and its delta (max position + 1 - S), from the items' grids in prompt
    order: the numbers ``ArlowModel.get_rope_index`` gives ``generate()``."""
    grids: dict[str, list[torch.Tensor]] = {"image": [], "video": []}
    seconds: list[float] = []
    for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
        data = feature.data
        grids[feature.modality].append(torch.as_tensor(data[f"{feature.modality}_grid_thw"].data).view(3))
        if feature.modality == "video" and "second_per_grid_ts" in data:
            seconds.append(float(data["second_per_grid_ts"].data))
    ids = torch.tensor([list(input_tokens)], dtype=torch.long)
    image_grid = torch.stack(grids["image"]) if grids["image"] else None
    video_grid = torch.stack(grids["video"]) if grids["video"] else None
    use_seconds = video_grid is not None and len(seconds) == len(video_grid)
    positions, delta = get_rope_index(
        ids, image_grid, video_grid, None,
        image_token_id=config.image_token_id, video_token_id=config.video_token_id,
        spatial_merge_size=config.vision_config.spatial_merge_size,
        second_per_grid_ts=torch.tensor(seconds) if use_seconds else None,
        tokens_per_second=config.tokens_per_second,
    )
    return positions[:, 0], int(delta)


@MULTIMODAL_REGISTRY.register_processor(ArlowMultiModalProcessor, info=ArlowProcessingInfo,
                                        dummy_inputs=ArlowDummyInputsBuilder)
class ArlowForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsMRoPE):
    """vLLM model for ``ArlowForConditionalGeneration`` checkpoints: ``visual`` (Arlow's vision tower) +
    ``language_model`` (:class:`~arlow.serving.vllm_text.ArlowForCausalLM`), DeepStack carried between them."""

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<|vision_start|><image><|vision_end|>"
        if modality.startswith("video"):
            return "<|vision_start|><video><|vision_end|>"
        raise ValueError(f"Arlow takes images and videos, not {modality!r}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: ArlowConfig = vllm_config.model_config.hf_config
        self.config = config
        with self._mark_tower_model(vllm_config, set(_MODALITIES)):
            self.visual = ArlowVLVisionModel._from_config(config.vision_config, attn_implementation="sdpa",
                                                          dtype=vllm_config.model_config.dtype)
        with self._mark_language_model(vllm_config):
            self.language_model = ArlowForCausalLM(
                vllm_config=vllm_config.with_hf_config(config.text_config, architectures=["ArlowForCausalLM"]),
                prefix=maybe_prefix(prefix, "language_model"),
                tie_word_embeddings=config.tie_word_embeddings,
            )
        self.hidden_size = config.text_config.hidden_size
        self.num_levels = len(config.deepstack_text_layers)
        # (L, T, Hd) DeepStack rows of the tokens embedded last, consumed by the next forward pass.
        self._pending_deepstack: torch.Tensor | None = None

    # -- media -> embeddings ---------------------------------------------------------------------------------------

    def _encode(self, pixels: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per item ``(t*h*w / s**2, Hd * (1 + L))``: merged tokens, then the DeepStack levels."""
        grid = torch.as_tensor(grid).reshape(-1, 3)
        out = self.visual(pixels.to(self.visual.dtype), grid_thw=grid)
        joined = torch.cat([out.last_hidden_state, *out.deepstack_features], dim=-1)
        sizes = (grid.prod(-1) // self.config.vision_config.spatial_merge_size**2).tolist()
        return joined.split(sizes)

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings | None:
        items: list[torch.Tensor] = []
        for key in kwargs:  # one modality per call, in prompt order (vLLM groups items by modality)
            if key == "pixel_values":
                items.extend(self._encode(kwargs["pixel_values"], kwargs["image_grid_thw"]))
            elif key == "pixel_values_videos":
                items.extend(self._encode(kwargs["pixel_values_videos"], kwargs["video_grid_thw"]))
        return tuple(items) if items else None

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings: MultiModalEmbeddings | None = None,
                        *, is_multimodal: torch.Tensor | None = None) -> torch.Tensor:
        """``input_ids (T,)`` -> ``(T, Hd)``; visual rows replace the placeholders, DeepStack rows are kept for
        :meth:`forward`."""
        embeds = self._embed_text_input_ids(input_ids, self.language_model.embed_input_ids,
                                            is_multimodal=is_multimodal)
        if multimodal_embeddings is None or len(multimodal_embeddings) == 0:
            return embeds
        if is_multimodal is None:
            raise ValueError("multimodal embeddings came without the is_multimodal mask that places them")
        joined = torch.cat(list(multimodal_embeddings)).to(embeds.dtype)
        embeds[is_multimodal] = joined[:, :self.hidden_size]
        if self.num_levels:
            rows = embeds.new_zeros(embeds.shape[0], self.num_levels * self.hidden_size)
            rows[is_multimodal] = joined[:, self.hidden_size:]
            self._pending_deepstack = rows.view(-1, self.num_levels, self.hidden_size).transpose(0, 1)
        return embeds

    def _deepstack_plan(self, tokens: int) -> dict[int, torch.Tensor] | None:
        """``{text_layer: (T, Hd)}`` from the pending levels (gated, summed per layer), or ``None``."""
        pending, self._pending_deepstack = self._pending_deepstack, None
        if pending is None:
            return None
        if pending.shape[1] != tokens:
            if pending.shape[1] > tokens:
                raise ValueError(f"DeepStack rows were prepared for {pending.shape[1]} tokens but the step has "
                                 f"{tokens}; embed_input_ids and forward must see the same tokens")
            pending = nn.functional.pad(pending, (0, 0, 0, tokens - pending.shape[1]))
        text = self.config.text_config
        gates = self.language_model.model.visual_gates
        plan: dict[int, torch.Tensor] = {}
        for level, layer in enumerate(self.config.deepstack_text_layers):
            plan[layer] = plan[layer] + pending[level] if layer in plan else pending[level]
        if gates is not None:
            start = text.gated_cross_attention_start_layer
            plan = {layer: rows * torch.sigmoid(gates[layer]).to(rows.dtype)
                    for layer, rows in plan.items() if start is None or layer >= start}
        return plan

    # -- positions and forward -------------------------------------------------------------------------------------

    def get_mrope_input_positions(self, input_tokens: list[int],
                                  mm_features: list[MultiModalFeatureSpec]) -> tuple[torch.Tensor, int]:
        return mrope_positions(input_tokens, mm_features, self.config)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor:
        tokens = (inputs_embeds if inputs_embeds is not None else input_ids).shape[0]
        deepstack = self._deepstack_plan(tokens) if inputs_embeds is not None else None
        return self.language_model.model(input_ids, positions, inputs_embeds, deepstack)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        def rename(name: str) -> str:
            for old, new in (("model.visual.", "visual."), ("model.language_model.", "language_model.model."),
                             ("lm_head.", "language_model.lm_head.")):
                if name.startswith(old):
                    return new + name[len(old):]
            return name

        skip = {"language_model.lm_head.weight"} if self.language_model.tied else set()
        return load_arlow_weights(self, weights, rename=rename, skip=skip)
