"""Configs: defaults, derived fields, validation errors, round trips, and the fork's layouts."""

import json

import pytest
from transformers import AutoConfig

import arlow  # noqa: F401  (registers the Auto classes)
from arlow import ArlowConfig, ArlowTextConfig, ArlowVisionConfig
from arlow.configuration import default_deepstack_indexes, default_mrope_sections


def test_vision_defaults_are_the_published_encoder():
    c = ArlowVisionConfig()
    assert (c.depth, c.embed_dim, c.hidden_size, c.num_heads) == (48, 1536, 3072, 24)
    assert (c.patch_size, c.temporal_patch_size, c.spatial_merge_size, c.hidden_act) == (14, 2, 2, "gelu_pytorch_tanh")
    assert c.deepstack_visual_indexes == [12, 24, 44]
    assert sum(c.mrope_sections) == c.head_dim == 64
    assert c.patch_dim == 1176
    assert c.num_attention_heads == 24 and c.num_hidden_layers == 48  # attribute_map aliases


@pytest.mark.parametrize("depth,expected", [(2, []), (6, [1, 3, 2][:0] or [1, 2, 3]), (8, [2, 4]), (12, [3, 6, 8]),
                                            (48, [12, 24, 44])])
def test_deepstack_rule(depth, expected):
    assert default_deepstack_indexes(depth) == expected


@pytest.mark.parametrize("head_dim", [8, 16, 64, 96, 128, 80])
def test_default_sections_even_and_complete(head_dim):
    s = default_mrope_sections(head_dim)
    assert sum(s) == head_dim and all(v % 2 == 0 for v in s)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(embed_dim=30, num_heads=4), "divisible"),
        (dict(embed_dim=36, num_heads=4), "must be even"),
        (dict(mrope_sections=[21, 21, 22]), "even"),
        (dict(mrope_sections=[20, 20, 20]), "sum to 60"),
        (dict(deepstack_visual_indexes=[99]), "block indexes"),
        (dict(depth=0), "depth"),
    ],
)
def test_vision_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ArlowVisionConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(hidden_size=100, num_attention_heads=8, num_key_value_heads=4), "not divisible"),
        (dict(num_attention_heads=6, num_key_value_heads=4, hidden_size=96), "multiple of num_key_value_heads"),
        (dict(vocab_size=10, eos_token_id=10), "outside the vocabulary"),
        (dict(vocab_size=10, pad_token_id=-1), "outside the vocabulary"),
        (dict(layer_types=["full_attention"], num_hidden_layers=2), "num_hidden_layers"),
        (dict(layer_types=["sliding_attention"] * 32), "use_sliding_window"),
        (dict(gated_cross_attention_start_layer=40), "layer index"),
    ],
)
def test_text_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ArlowTextConfig(**kwargs)


def test_sliding_layer_types_derived():
    c = ArlowTextConfig(num_hidden_layers=4, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    assert c.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    assert ArlowTextConfig().sliding_window is None  # window off -> no window stored


def test_legacy_rope_keys_are_converted():
    c = ArlowTextConfig(rope_theta=5000.0, rope_scaling={"type": "linear", "factor": 2.0})
    assert c.rope_parameters["rope_type"] == "linear" and c.rope_parameters["rope_theta"] == 5000.0


def tiny_multimodal(**kw):
    return ArlowConfig(
        text_config=dict(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2),
        vision_config=dict(depth=6, embed_dim=32, num_heads=4, hidden_size=64),
        **kw,
    )


def test_multimodal_defaults_and_ids():
    c = tiny_multimodal()
    assert [c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id] == [96, 97, 98, 99]
    assert c.deepstack_text_layers == [0, 1, 2]
    default = ArlowConfig()
    assert default.vision_config.hidden_size == default.text_config.hidden_size  # never a width mismatch


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(image_token_id=100), "outside the vocabulary"),
        (dict(image_token_id=5, video_token_id=5), "distinct"),
        (dict(deepstack_text_layers=[0, 1]), "one text layer per level"),
        (dict(deepstack_text_layers=[0, 1, 7]), "not text layers"),
    ],
)
def test_multimodal_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_multimodal(**kwargs)


def test_width_mismatch_is_an_error():
    with pytest.raises(ValueError, match="must equal text hidden_size"):
        ArlowConfig(text_config=dict(hidden_size=64, num_attention_heads=4), vision_config=dict(hidden_size=32))


def test_round_trip_through_autoconfig(tmp_path):
    c = tiny_multimodal(tokens_per_second=2.0)
    c.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ArlowConfig)
    assert loaded.to_diff_dict() == c.to_diff_dict()
    c.vision_config.save_pretrained(tmp_path / "vision")
    v = AutoConfig.from_pretrained(tmp_path / "vision")
    assert isinstance(v, ArlowVisionConfig) and v.to_diff_dict() == c.vision_config.to_diff_dict()


def test_fork_flat_layout_loads(tmp_path):
    """The fork saved text fields at the top level and the vision config with model_type "arlow"."""
    fork = {
        "model_type": "arlow", "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0, "_mrope_ratio": [0.3, 0.3, 0.3],
        "mm_tokens_per_image": 512, "image_token_id": 96, "video_token_id": 97, "vision_start_token_id": 98,
        "vision_end_token_id": 99,
        "vision_config": {"model_type": "arlow", "depth": 6, "embed_dim": 32, "num_heads": 4, "hidden_size": 64,
                          "token_pruning_ratio": 0.0, "max_position_embeddings": 32768},
    }
    (tmp_path / "config.json").write_text(json.dumps(fork))
    c = AutoConfig.from_pretrained(tmp_path)
    assert c.text_config.hidden_size == 64 and c.text_config.rope_parameters["rope_theta"] == 10000.0
    assert not hasattr(c, "mm_tokens_per_image") and not hasattr(c.vision_config, "token_pruning_ratio")
