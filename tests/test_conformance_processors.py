"""transformers' common processor suite (``ProcessorTesterMixin``) run against :class:`ArlowProcessor`.

The suite comes from the installed transformers version's own test folder (see ``tests/upstream.py``); this file
supplies the components, as transformers' Qwen2-VL processor tester does. A test is skipped here only with the
reason it does not apply; anything else that fails is an Arlow bug.
"""

import unittest

import upstream
from transformers.utils import is_torchvision_available

from arlow.processing import ArlowImageProcessor, ArlowProcessor, ArlowVideoProcessor, load_default_tokenizer

processing_common = upstream.load("test_processing_common")

NEEDS_NETWORK = ("reads its videos from the Hugging Face Hub, expecting their frame counts (the source distribution "
                 "lacks utils/fetch_hub_objects_for_ci.py, which maps them to a local cache)")
AUTO_VIDEO = ("loads the video processor through AutoVideoProcessor, which transformers defines only with torchvision "
              "(never a dependency of Arlow); ArlowProcessor.from_pretrained loads it without (test_processing.py)")


class ArlowProcessorConformanceTest(processing_common.ProcessorTesterMixin, unittest.TestCase):
    processor_class = ArlowProcessor

    # Small area bounds keep every image and video within the suite's text lengths (its max_length values are
    # per-model settings; Qwen2-VL's tester shrinks its processors the same way).
    @classmethod
    def _setup_image_processor(cls):
        return ArlowImageProcessor(min_pixels=28 * 28, max_pixels=28 * 28 * 16)

    @classmethod
    def _setup_video_processor(cls):
        return ArlowVideoProcessor(min_pixels=28 * 28, max_pixels=28 * 28 * 4)

    @classmethod
    def _setup_tokenizer(cls):
        return load_default_tokenizer()

    def get_component(self, attribute, use_tiny_ckpt=True, **kwargs):
        # transformers finds a part through its Auto class; AutoVideoProcessor needs torchvision (AUTO_VIDEO).
        if attribute == "video_processor" and not is_torchvision_available():
            return ArlowVideoProcessor.from_pretrained(self.tmpdirname, **kwargs)
        return super().get_component(attribute, use_tiny_ckpt=use_tiny_ckpt, **kwargs)

    def test_processor_from_and_save_pretrained_as_nested_dict(self):
        if not is_torchvision_available():
            self.skipTest(AUTO_VIDEO)
        super().test_processor_from_and_save_pretrained_as_nested_dict()

    def _skip_without_hub_media(self):
        if upstream.needs("utils.fetch_hub_objects_for_ci"):
            self.skipTest(NEEDS_NETWORK)



def _needs_hub_media(name: str):
    """Wrap the suite's test ``name`` (parameterized ones too) so it skips where Hub media cannot be read."""
    test = getattr(processing_common.ProcessorTesterMixin, name)

    def wrapped(self):
        self._skip_without_hub_media()
        return test(self)

    wrapped.__name__ = name
    return wrapped


for _name in dir(processing_common.ProcessorTesterMixin):
    if _name.startswith(("test_apply_chat_template_video", "test_apply_chat_template_decoded_video",
                         "test_chat_template_audio_from_video")):
        setattr(ArlowProcessorConformanceTest, _name, _needs_hub_media(_name))
