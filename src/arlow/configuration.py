"""Configuration classes of the Arlow models.

Field names follow the reference fork so that its ``config.json`` files load (see
``shared/reference/reference-fork.md`` §1). Differences, all deliberate:

* ``ArlowVisionConfig`` has its own ``model_type`` (``"arlow_vision"``) so that an exported encoder round-trips
  through ``AutoConfig``/``AutoModel``; a vision config saved with the fork's ``"arlow"`` is accepted.
* ``ArlowConfig`` nests the text decoder's fields under ``text_config`` (the transformers v5 layout). The fork's
  flat layout (text fields at the top level) is still accepted and moved into ``text_config``.
* Fields no model code reads are gone (``token_pruning_ratio``, ``mm_tokens_per_image``, ``pan_and_scan`` ...).
* Impossible combinations raise ``ValueError`` at construction with a message that says what to change.

Rotary sections (``mrope_sections``) are counted in head-dim channels, as in the fork, and must sum to the
head dim. Each must be even because RoPE rotates channel *pairs*: a section of ``s`` channels owns ``s / 2``
rotary frequencies.
"""

from __future__ import annotations

import inspect
import math

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from ._compat import build_sub_configs, declare_sub_configs

__all__ = ["ArlowVisionConfig", "ArlowTextConfig", "ArlowConfig", "default_mrope_sections"]


def default_mrope_sections(head_dim: int) -> list[int]:
    """Split ``head_dim`` channels into even (t, h, w) sections that sum to ``head_dim``.

    The ``head_dim / 2`` rotary frequencies are split as evenly as possible, the remainder going to the spatial
    axes (w first): 96 -> [32, 32, 32], 64 -> [20, 22, 22], 128 -> [42, 42, 44], 16 -> [4, 6, 6].
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
    slots = head_dim // 2
    t = slots // 3
    h = (slots - t) // 2
    w = slots - t - h
    return [2 * t, 2 * h, 2 * w]


def _check_sections(sections: list[int], head_dim: int, owner: str) -> None:
    if len(sections) != 3:
        raise ValueError(f"{owner}.mrope_sections must have 3 entries (t, h, w), got {sections}")
    if any(s < 0 or s % 2 for s in sections):
        raise ValueError(
            f"{owner}.mrope_sections {sections} must be non-negative and even: rotary embeddings rotate channel "
            f"pairs, so each axis owns an even number of channels. Try {default_mrope_sections(head_dim)}."
        )
    if sum(sections) != head_dim:
        raise ValueError(
            f"{owner}.mrope_sections {sections} sum to {sum(sections)} but the head dim is {head_dim}. "
            f"Try {default_mrope_sections(head_dim)}."
        )


def default_deepstack_indexes(depth: int) -> list[int]:
    """The fork's rule: {depth//4, depth//2, depth-4} for depth >= 6, else none (48 -> [12, 24, 44])."""
    if depth < 6:
        return []
    return sorted({depth // 4, depth // 2, depth - 4})


@strict(accept_kwargs=True)
class ArlowVisionConfig(PreTrainedConfig):
    r"""Configuration of ``ArlowVLVisionModel``; the defaults are the published Arlow vision encoder (1.59 B).

    Args:
        depth: number of transformer blocks.
        embed_dim: width of the blocks (``E``).
        hidden_size: width of the merged output tokens; must equal the language model's width in a VLM.
        hidden_act: activation of the block MLPs (the mergers use exact GELU).
        mlp_ratio: block MLP width is ``int(embed_dim * mlp_ratio)``.
        num_heads: attention heads; ``embed_dim / num_heads`` must be an even integer.
        in_channels, patch_size, temporal_patch_size: the Conv3d tubelet ``(Tp, P, P)`` over ``C`` channels.
        spatial_merge_size: ``s``; each ``s x s`` window of patches becomes one output token.
        use_deformable_attention: add the parameter-free locality bias to attention scores.
        deformable_attention_window: radius (in normalised (t, h, w) coordinates of each item) beyond which
            scores get an extra ``-100 * strength`` (effectively masked). ``<= 0`` disables the cut-off.
        deformable_attention_strength: slope of the ``-strength * distance`` decay.
        video_attention: ``"clip"`` (default): every patch of a video attends to the whole clip. ``"frame"``: to
            its own temporal slice only, as Qwen2-VL's encoder does - ``1/t`` of the attention scores of a clip of
            ``t`` temporal patches, with time mixed only inside each temporal patch (and later by the LM).
        num_position_embeddings: ``0`` (the published encoder): positions reach the encoder only through the
            relative rotary angles and the locality bias. ``S * S > 0``: a learned ``S x S`` table of absolute
            position embeddings (initialised with MAE's 2-D sine-cosine table; ``embed_dim`` a multiple of 4),
            bilinearly interpolated to each item's (h, w) grid and added to the patch embeddings (Qwen3-VL's
            ``pos_embed``), so each token's content says where in its image it sits.
        position_embedding_scale: the table's initial value is the sine-cosine table times this (norm
            ``scale * sqrt(embed_dim / 2)`` per row). The position must not be drowned by the patch embeddings it is
            added to, whose norm grows with the pixels' and the projection's scale (about 36 after a few MAE steps
            on the shapes demonstration's images, against 5.7 for the unscaled table of width 64).
        use_progressive_patches: add a learned projection of the ``s x s``-pooled patch embeddings (a coarser
            scale) to every patch before block 0.
        deepstack_visual_indexes: blocks after which a DeepStack merger taps the hidden states. ``None`` derives
            ``{depth//4, depth//2, depth-4}`` (depth >= 6) as the fork does.
        mrope_sections: channels of each head's rotary embedding given to the (t, h, w) axes.
        rope_theta: base of the rotary frequencies.
        initializer_range: std of the normal init of linear layers.
    """

    model_type = "arlow_vision"
    base_config_key = "vision_config"
    attribute_map = {"num_attention_heads": "num_heads", "num_hidden_layers": "depth"}

    depth: int = 48
    embed_dim: int = 1536
    hidden_size: int = 3072
    hidden_act: str = "gelu_pytorch_tanh"
    mlp_ratio: float = 4.0
    num_heads: int = 24
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    use_deformable_attention: bool = True
    deformable_attention_window: float = 0.25
    deformable_attention_strength: float = 4.0
    video_attention: str = "clip"
    num_position_embeddings: int = 0
    position_embedding_scale: float = 1.0
    use_progressive_patches: bool = True
    deepstack_visual_indexes: list[int] | None = None
    mrope_sections: list[int] | None = None
    rope_theta: float = 100000.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        for dead in ("token_pruning_ratio", "max_position_embeddings"):
            kwargs.pop(dead, None)  # stored by the fork, read by nothing
        for name in ("depth", "embed_dim", "hidden_size", "num_heads", "in_channels", "patch_size",
                     "temporal_patch_size", "spatial_merge_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ArlowVisionConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"ArlowVisionConfig: embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        head_dim = self.embed_dim // self.num_heads
        if head_dim % 2:
            raise ValueError(f"ArlowVisionConfig: head dim embed_dim/num_heads = {head_dim} must be even for RoPE")
        if int(self.embed_dim * self.mlp_ratio) < 1:
            raise ValueError(f"ArlowVisionConfig.mlp_ratio must be positive, got {self.mlp_ratio}")
        if self.num_position_embeddings < 0 or math.isqrt(self.num_position_embeddings) ** 2 != self.num_position_embeddings:
            raise ValueError(
                f"ArlowVisionConfig.num_position_embeddings must be 0 (none) or a square S*S (an S x S table), got "
                f"{self.num_position_embeddings}"
            )
        if self.num_position_embeddings and self.embed_dim % 4:
            raise ValueError(f"ArlowVisionConfig: the absolute position table needs embed_dim % 4 == 0, got {self.embed_dim}")
        if not self.position_embedding_scale > 0:
            raise ValueError(f"ArlowVisionConfig.position_embedding_scale must be > 0, got {self.position_embedding_scale}")
        if self.deformable_attention_strength < 0:
            raise ValueError("ArlowVisionConfig.deformable_attention_strength must be >= 0")
        if self.video_attention not in ("clip", "frame"):
            raise ValueError(f"ArlowVisionConfig.video_attention must be 'clip' or 'frame', got {self.video_attention!r}")
        if self.deepstack_visual_indexes is None:
            self.deepstack_visual_indexes = default_deepstack_indexes(self.depth)
        else:
            bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
            if bad:
                raise ValueError(
                    f"ArlowVisionConfig.deepstack_visual_indexes {bad} are not block indexes in [0, {self.depth})"
                )
            self.deepstack_visual_indexes = sorted(set(self.deepstack_visual_indexes))
        if self.mrope_sections is None:
            self.mrope_sections = default_mrope_sections(head_dim)
        _check_sections(self.mrope_sections, head_dim, "ArlowVisionConfig")
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row: ``C * Tp * P * P`` (1176 for the defaults)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@strict(accept_kwargs=True)
class ArlowTextConfig(PreTrainedConfig):
    r"""Configuration of the Arlow decoder-only language model (``ArlowTextModel`` / ``ArlowForCausalLM``).

    Args:
        vocab_size, hidden_size, intermediate_size, num_hidden_layers: the usual sizes.
        num_attention_heads, num_key_value_heads: query heads and key/value heads (GQA);
            ``num_attention_heads`` must be a multiple of ``num_key_value_heads``.
        head_dim: per-head width; ``None`` -> ``hidden_size // num_attention_heads``.
        hidden_act: activation of the SwiGLU gate.
        max_position_embeddings: positions the model was trained for (used by RoPE scaling variants).
        rms_norm_eps: epsilon of RMSNorm.
        rope_parameters: transformers rope dict (``rope_type`` default/linear/dynamic/yarn/llama3/... and
            ``rope_theta``); the legacy ``rope_theta``/``rope_scaling`` keys are converted.
        mrope_sections: channels of each head given to the (t, h, w) axes of multimodal 3-D positions.
        attention_bias: biases on q/k/v projections (o_proj never has one).
        use_qk_norm: RMSNorm over each query/key head (weights ``q_norm``/``k_norm`` of shape ``(head_dim,)``)
            before RoPE, as in Qwen3. Off in the fork's architecture.
        attention_dropout, resid_dropout, mlp_dropout: dropout on attention weights, on each residual branch,
            and inside the MLP.
        use_sliding_window, sliding_window, max_window_layers, layer_types: layer ``i`` is
            ``"sliding_attention"`` when the window is on and ``i >= max_window_layers``, unless
            ``layer_types`` is given explicitly.
        tie_word_embeddings: share ``lm_head`` with the input embedding.
        use_gated_cross_attention: DeepStack additions (multimodal use) are scaled by a learned per-layer
            ``sigmoid(visual_gates[l])`` (parameter ``visual_gates (num_hidden_layers,)``, initialised to 0, i.e.
            0.5). The fork's name; there is no cross-attention.
        gated_cross_attention_start_layer: with gates on, DeepStack additions before this layer are skipped.
    """

    model_type = "arlow_text"
    base_config_key = "text_config"
    keys_to_ignore_at_inference = ["past_key_values"]
    default_theta = 100000.0
    ignore_keys_at_rope_validation = {"mrope_sections", "mrope_section"}
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 131072
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 32
    num_attention_heads: int = 24
    num_key_value_heads: int | None = 4
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    rope_parameters: RopeParameters | dict | None = None
    mrope_sections: list[int] | None = None
    attention_bias: bool = False
    use_qk_norm: bool = False
    attention_dropout: float = 0.0
    resid_dropout: float = 0.0
    mlp_dropout: float = 0.0
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    layer_types: list[str] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = False
    use_gated_cross_attention: bool = False
    gated_cross_attention_start_layer: int | None = None

    def __post_init__(self, **kwargs):
        kwargs.pop("_mrope_ratio", None)  # written by the fork, derived, never read
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads}) for grouped-query attention"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}); set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.mrope_sections is None:
            self.mrope_sections = default_mrope_sections(self.head_dim)
        _check_sections(self.mrope_sections, self.head_dim, type(self).__name__)
        if self.use_sliding_window:
            if self.sliding_window is None or self.sliding_window < 1:
                raise ValueError("use_sliding_window=True needs sliding_window >= 1")
        else:
            self.sliding_window = None
        if self.layer_types is None:
            self.layer_types = [
                "sliding_attention" if self.sliding_window is not None and i >= self.max_window_layers
                else "full_attention"
                for i in range(self.num_hidden_layers)
            ]
        elif "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ValueError("layer_types has sliding_attention layers but use_sliding_window is False")
        start = self.gated_cross_attention_start_layer
        if start is not None and not 0 <= start < self.num_hidden_layers:
            raise ValueError(f"gated_cross_attention_start_layer={start} is not a layer index in "
                             f"[0, {self.num_hidden_layers})")
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{name}={value} lies outside the vocabulary [0, {self.vocab_size})")
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        for value in eos:
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"eos_token_id={value} lies outside the vocabulary [0, {self.vocab_size})")
        super().__post_init__(**kwargs)
        self.validate_layer_type()

    def convert_rope_params_to_dict(self, **kwargs):
        rope_scaling = kwargs.pop("rope_scaling", None)
        self.rope_parameters = dict(rope_scaling or self.rope_parameters or {})
        self.rope_parameters.setdefault("rope_theta", kwargs.pop("rope_theta", self.default_theta))
        kwargs.pop("rope_theta", None)
        if "type" in self.rope_parameters and "rope_type" not in self.rope_parameters:
            self.rope_parameters["rope_type"] = self.rope_parameters.pop("type")
        if self.rope_parameters.get("rope_type") == "mrope":
            self.rope_parameters["rope_type"] = "default"
        self.standardize_rope_params()
        self.validate_rope()
        return kwargs


_TEXT_FIELDS = tuple(
    name for name in inspect.signature(ArlowTextConfig.__init__).parameters if name not in ("self", "kwargs")
) + ("rope_scaling", "rope_theta", "_mrope_ratio")


@declare_sub_configs
@strict(accept_kwargs=True)
class ArlowConfig(PreTrainedConfig):
    r"""Configuration of ``ArlowModel`` / ``ArlowForConditionalGeneration``: a vision encoder and a text decoder.

    Args:
        vision_config: ``ArlowVisionConfig`` or its dict. ``None`` -> the published encoder, with its output width
            set to the text width.
        text_config: ``ArlowTextConfig`` or its dict. ``None`` -> built from flat text keys (the fork's layout)
            or the defaults.
        image_token_id, video_token_id, vision_start_token_id, vision_end_token_id: special-token ids; ``None``
            -> the last four ids of the vocabulary, in that order. They must be distinct and inside the vocabulary.
        deepstack_text_layers: text layer after which each DeepStack level is added (level k -> entry k).
            ``None`` -> ``[0, 1, ..., K-1]`` (Qwen3-VL's rule). Must have one entry per level, each a valid layer.
        tokens_per_second: if set, video temporal M-RoPE positions follow real time: temporal index ->
            ``round(t * seconds_per_temporal_patch * tokens_per_second)``. ``None`` -> one position per temporal
            patch.
        tie_word_embeddings: share ``lm_head`` with the input embedding.
    """

    model_type = "arlow"
    sub_configs_defaults = {"vision_config": ArlowVisionConfig, "text_config": ArlowTextConfig}
    keys_to_ignore_at_inference = ["past_key_values"]

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int | None = None
    video_token_id: int | None = None
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    deepstack_text_layers: list[int] | None = None
    tokens_per_second: float | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        for dead in ("mm_tokens_per_image", "mm_tokens_per_video", "video_max_frames", "video_sample_strategy",
                     "dynamic_resolution", "pan_and_scan", "timestamp_alignment", "frame_separator_token_id"):
            kwargs.pop(dead, None)  # stored by the fork, read by nothing
        if self.text_config is None:
            # The fork saved text fields at the top level: move them into the text sub-config.
            self.text_config = {key: kwargs.pop(key) for key in _TEXT_FIELDS if key in kwargs}
        elif isinstance(self.text_config, dict):
            self.text_config = dict(self.text_config)
        if isinstance(self.vision_config, dict):
            self.vision_config = dict(self.vision_config)
            if self.vision_config.get("model_type") == "arlow":  # the fork's vision configs
                self.vision_config["model_type"] = "arlow_vision"
        if self.vision_config is None:
            text_width = (self.text_config.get("hidden_size", ArlowTextConfig.hidden_size)
                          if isinstance(self.text_config, dict) else self.text_config.hidden_size)
            self.vision_config = {"hidden_size": text_width}
        build_sub_configs(self)
        super().__post_init__(**kwargs)
        text, vision = self.text_config, self.vision_config
        if vision.hidden_size != text.hidden_size:
            raise ValueError(
                f"vision_config.hidden_size ({vision.hidden_size}) must equal text hidden_size ({text.hidden_size}): "
                "merged vision tokens replace text embeddings. Set vision_config.hidden_size to the text width."
            )
        vocab = text.vocab_size
        names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        for offset, name in enumerate(names):
            if getattr(self, name) is None:
                setattr(self, name, vocab - 4 + offset)
            value = getattr(self, name)
            if not 0 <= value < vocab:
                raise ValueError(
                    f"{name}={value} lies outside the vocabulary [0, {vocab}); enlarge text vocab_size or use the "
                    "ids the tokenizer assigned"
                )
        ids = [getattr(self, name) for name in names]
        if len(set(ids)) != 4:
            raise ValueError(f"the four multimodal special-token ids must be distinct, got {dict(zip(names, ids))}")
        levels = len(vision.deepstack_visual_indexes)
        if self.deepstack_text_layers is None:
            self.deepstack_text_layers = list(range(levels))
        if len(self.deepstack_text_layers) != levels:
            raise ValueError(
                f"deepstack_text_layers has {len(self.deepstack_text_layers)} entries but the vision encoder has "
                f"{levels} DeepStack levels ({vision.deepstack_visual_indexes}); give one text layer per level"
            )
        bad = [i for i in self.deepstack_text_layers if not 0 <= i < text.num_hidden_layers]
        if bad:
            raise ValueError(
                f"deepstack_text_layers {bad} are not text layers in [0, {text.num_hidden_layers}); no DeepStack "
                "level is dropped silently"
            )
        if self.tokens_per_second is not None and self.tokens_per_second <= 0:
            raise ValueError("tokens_per_second must be positive or None")

    @property
    def mrope_section(self) -> list[int]:
        """The text decoder's M-RoPE split in rotary frequencies (``mrope_sections / 2``), under the name serving
        engines look for: vLLM gives a model 3-D (t, h, w) positions when its top-level config has this key."""
        return [s // 2 for s in self.text_config.mrope_sections]
