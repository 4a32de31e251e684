"""transformers' common model suites (``ModelTesterMixin``, ``ConfigTester``) run against the Arlow text decoder (all
heads), the vision-language model and the stand-alone vision encoder. The encoder's input is packed (patch rows of
all items + their grids): its tester counts items as the batch and rows as the sequence.

The suites come from the installed transformers version's own test folder (see ``tests/upstream.py``); this file
only supplies tiny configurations and inputs, as transformers' Qwen2 / Qwen2-VL testers do. A test is skipped here
only with the reason it does not apply; anything else that fails is an Arlow bug.
"""

import unittest
from unittest import mock

import torch
import upstream
from transformers.models.auto import modeling_auto

from arlow.configuration import ArlowConfig, ArlowTextConfig, ArlowVisionConfig
from arlow.modeling.multimodal import ArlowForConditionalGeneration, ArlowModel
from arlow.modeling.vision import ArlowVLVisionModel
from arlow.modeling.text import (
    ArlowForCausalLM,
    ArlowForQuestionAnswering,
    ArlowForSequenceClassification,
    ArlowForTokenClassification,
    ArlowTextModel,
)

common = upstream.load("test_modeling_common")
config_common = upstream.load("test_configuration_common")
GenerationTesterMixin = upstream.load("generation.test_utils").GenerationTesterMixin
ids_tensor, floats_tensor = common.ids_tensor, common.floats_tensor

TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
VISION = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2.0, patch_size=14,
              temporal_patch_size=2, spatial_merge_size=2, use_deformable_attention=False,
              use_progressive_patches=False)


# The suites find a class's task (labels to build, base models to leave out of training) in transformers' name maps
# of in-tree models; Arlow registers with the Auto classes at run time instead. List it there, as arlow.auto does.
TASK_NAMES = {
    "MODEL_MAPPING_NAMES": {"arlow_text": "ArlowTextModel", "arlow": "ArlowModel",
                            "arlow_vision": "ArlowVLVisionModel"},
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": {"arlow_text": "ArlowForCausalLM"},
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": {"arlow_text": "ArlowForSequenceClassification"},
    "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES": {"arlow_text": "ArlowForTokenClassification"},
    "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES": {"arlow_text": "ArlowForQuestionAnswering"},
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES": {"arlow": "ArlowForConditionalGeneration"},
}

# Not implemented in Arlow (said in docs/multimodal.md): the packed encoder attends item by item (or group by group),
# so there is no (batch, heads, q, k) weights tensor for a pack; it returns no attention weights.
PACKED_ATTENTION = "the packed vision encoder returns no attention weights (one attention call per item group)"


def setUpModule():
    for name, entries in TASK_NAMES.items():
        patcher = mock.patch.dict(getattr(modeling_auto, name), entries)
        patcher.start()
        unittest.addModuleCleanup(patcher.stop)


def _skip_if_standin(test_case, helper: str) -> None:
    reason = upstream.needs(helper)
    if reason:
        test_case.skipTest(reason)


def run_config_checks(tester, *extra: str) -> None:
    """transformers' ConfigTester checks that apply to Arlow's configs, plus ``extra`` ones."""
    for check in ("create_and_test_config_to_json_string", "create_and_test_config_to_json_file",
                  "create_and_test_config_from_and_save_pretrained",
                  "create_and_test_config_from_and_save_pretrained_subfolder",
                  "create_and_test_config_from_pretrained_custom_kwargs",
                  "check_config_can_be_init_without_params", *extra):
        getattr(tester, check)()


class _GenerationChecks:
    """Shared by the testers of classes that generate."""

    def test_generation_tester_mixin_inheritance(self):
        _skip_if_standin(self, "generation.test_utils")
        super().test_generation_tester_mixin_inheritance()


# ----------------------------------------------------------------------------------------------------------------
# Text decoder and its heads


class ArlowTextModelTester:
    def __init__(self, parent, batch_size=2, seq_length=7):
        self.parent, self.batch_size, self.seq_length = parent, batch_size, seq_length
        self.is_training = True
        self.num_labels = 3
        self.type_sequence_label_size = 2
        for key, value in TEXT.items():
            setattr(self, key, value)

    def get_config(self) -> ArlowTextConfig:
        return ArlowTextConfig(**TEXT, num_labels=self.num_labels)

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, :2] = 0  # left padding in one row
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class ArlowTextConformanceTest(_GenerationChecks, common.ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (ArlowTextModel, ArlowForCausalLM, ArlowForSequenceClassification,
                         ArlowForTokenClassification, ArlowForQuestionAnswering)

    def setUp(self):
        self.model_tester = ArlowTextModelTester(self)
        self.config_tester = config_common.ConfigTester(self, config_class=ArlowTextConfig, hidden_size=32,
                                                    num_attention_heads=4, num_key_value_heads=2)

    def test_config(self):
        run_config_checks(self.config_tester, "create_and_test_config_common_properties",
                          "create_and_test_config_from_and_save_pretrained_composite",
                          "create_and_test_config_with_num_labels")

    def test_config_arguments_init(self):
        _skip_if_standin(self, "utils.test_configuration_utils")
        self.config_tester.check_config_arguments_init()


# ----------------------------------------------------------------------------------------------------------------
# Vision-language model


class ArlowVLModelTester:
    """Two samples, one 28x28 image each (1x2x2 patches -> one run of 1 placeholder after merging 2x2)."""

    image_token_id, video_token_id, vision_start_token_id, vision_end_token_id = 3, 4, 5, 6

    def __init__(self, parent, batch_size=2, seq_length=7):
        self.parent, self.batch_size, self.seq_length = parent, batch_size, seq_length
        self.is_training = True
        self.num_labels = 3
        self.type_sequence_label_size = 2
        for key, value in TEXT.items():
            setattr(self, key, value)
        self.grid = (1, 2, 2)  # (t, h, w) patches per image
        self.patch_dim = 3 * VISION["temporal_patch_size"] * VISION["patch_size"] ** 2

    def get_config(self) -> ArlowConfig:
        text = dict(TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                    mrope_sections=[2, 2, 4])
        return ArlowConfig(vision_config=VISION, text_config=text, image_token_id=self.image_token_id,
                           video_token_id=self.video_token_id, vision_start_token_id=self.vision_start_token_id,
                           vision_end_token_id=self.vision_end_token_id)

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        special = torch.tensor([self.image_token_id, self.video_token_id, self.vision_start_token_id,
                                self.vision_end_token_id, TEXT["pad_token_id"]])
        input_ids[torch.isin(input_ids, special)] = 7  # random ids never add placeholders
        input_ids[:, 1:4] = torch.tensor([self.vision_start_token_id, self.image_token_id, self.vision_end_token_id])
        attention_mask = torch.ones_like(input_ids)
        rows = self.batch_size * self.grid[0] * self.grid[1] * self.grid[2]
        return config, {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": floats_tensor([rows, self.patch_dim]),
            "image_grid_thw": torch.tensor([self.grid] * self.batch_size),
        }


class ArlowVLConformanceTest(_GenerationChecks, common.ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (ArlowModel, ArlowForConditionalGeneration)
    _is_composite = True

    def setUp(self):
        self.model_tester = ArlowVLModelTester(self)
        self.config_tester = config_common.ConfigTester(self, config_class=ArlowConfig, has_text_modality=False)

    @unittest.skip(PACKED_ATTENTION)
    def test_get_image_features_attentions(self):
        pass

    @unittest.skip(PACKED_ATTENTION)
    def test_get_video_features_attentions(self):
        pass

    def test_config(self):
        run_config_checks(self.config_tester, "create_and_test_config_from_and_save_pretrained_composite")


# ----------------------------------------------------------------------------------------------------------------
# Stand-alone vision encoder


class ArlowVisionModelTester:
    """Two 28x28 images (1x2x2 patches each) packed into 8 patch rows: ``batch_size`` counts items, not rows."""

    def __init__(self, parent, batch_size=2):
        self.parent, self.batch_size = parent, batch_size
        self.is_training = True
        self.grid = (1, 2, 2)
        self.patch_dim = 3 * VISION["temporal_patch_size"] * VISION["patch_size"] ** 2
        self.hidden_size = VISION["embed_dim"]
        self.num_hidden_layers = VISION["depth"]
        self.num_attention_heads = VISION["num_heads"]
        self.seq_length = self.grid[0] * self.grid[1] * self.grid[2] * batch_size  # rows of the pack

    def get_config(self) -> ArlowVisionConfig:
        return ArlowVisionConfig(**VISION)

    def prepare_config_and_inputs_for_common(self):
        return self.get_config(), {
            "pixel_values": floats_tensor([self.seq_length, self.patch_dim]),
            "grid_thw": torch.tensor([self.grid] * self.batch_size),
        }


class ArlowVisionConformanceTest(common.ModelTesterMixin, unittest.TestCase):
    all_model_classes = (ArlowVLVisionModel,)
    has_attentions = False  # PACKED_ATTENTION
    test_resize_embeddings = False  # no token embeddings

    def setUp(self):
        self.model_tester = ArlowVisionModelTester(self)
        self.config_tester = config_common.ConfigTester(self, config_class=ArlowVisionConfig, has_text_modality=False)

    def test_model_get_set_embeddings(self):
        # As transformers' ViT-style testers: the input "embedding" of a vision encoder is its patch projection, not
        # a token table (the common test wants an nn.Embedding and sets a new one).
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        model = ArlowVLVisionModel(config)
        self.assertIsInstance(model.get_input_embeddings(), torch.nn.Module)
        self.assertIsNone(model.get_output_embeddings())

    def test_config(self):
        run_config_checks(self.config_tester)
