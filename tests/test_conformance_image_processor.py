"""transformers' common image-processor suite (``ImageProcessingTestMixin``) run against :class:`ArlowImageProcessor`.

The suite comes from the installed transformers version's own test folder (see ``tests/upstream.py``). As for
transformers' Qwen2-VL image processor, the output is packed: ``pixel_values (sum of t*h*w, C*Tp*P*P)`` for the
whole batch plus ``image_grid_thw``, so the shape checks of ``test_call_*`` are replaced by checks of the packed
shape against an independent :func:`smart_resize` computation. A test is skipped here only with the reason it does
not apply; anything else that fails is an Arlow bug.
"""

import unittest

import numpy as np
import upstream
from PIL import Image
from transformers.models.auto.image_processing_auto import AutoImageProcessor

from arlow.processing import ArlowImageProcessor, smart_resize

image_common = upstream.load("test_image_processing_common")

MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 64
PATCH_DIM = 3 * 2 * 14 * 14


class ArlowImageProcessingTester:
    """Seven images of 30-400 px a side (the suite's defaults), resized within ``[MIN_PIXELS, MAX_PIXELS]``."""

    def __init__(self, parent, batch_size=7, num_channels=3, min_resolution=30, max_resolution=400):
        self.parent, self.batch_size, self.num_channels = parent, batch_size, num_channels
        self.min_resolution, self.max_resolution = min_resolution, max_resolution
        self.size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
        self.image_processing_classes = {"pil": ArlowImageProcessor}

    def prepare_image_processor_dict(self):
        return {"size": dict(self.size), "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}

    def prepare_image_inputs(self, batch_size=None, min_resolution=None, max_resolution=None, num_channels=None,
                             size_divisor=None, equal_resolution=False, numpify=False, torchify=False):
        return image_common.prepare_image_inputs(
            batch_size=self.batch_size if batch_size is None else batch_size,
            num_channels=self.num_channels if num_channels is None else num_channels,
            min_resolution=self.min_resolution if min_resolution is None else min_resolution,
            max_resolution=self.max_resolution if max_resolution is None else max_resolution,
            size_divisor=size_divisor, equal_resolution=equal_resolution, numpify=numpify, torchify=torchify)

    def prepare_processor_inputs(self, **kwargs):
        return {"images": self.prepare_image_inputs(**kwargs)}

    @staticmethod
    def packed_rows(images) -> int:
        """Patch rows of a batch: per image ``(h / 14) * (w / 14)`` after smart_resize (one temporal patch)."""
        rows = 0
        for image in images:
            if isinstance(image, Image.Image):
                width, height = image.size
            elif isinstance(image, np.ndarray):
                height, width = image.shape[:2]
            else:  # torch (C, H, W)
                height, width = image.shape[1:]
            h, w = smart_resize(height, width, factor=28, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
            rows += (h // 14) * (w // 14)
        return rows


class ArlowImageProcessingConformanceTest(image_common.ImageProcessingTestMixin, unittest.TestCase):
    image_processor_tester_class = ArlowImageProcessingTester

    def setUp(self):
        self.image_processor_tester = ArlowImageProcessingTester(self)
        # transformers 5.17 reads the classes from the test case, 5.25 from the tester (a property)
        if not isinstance(getattr(type(self), "image_processing_classes", None), property):
            self.image_processing_classes = self.image_processor_tester.image_processing_classes

    @property
    def image_processor_dict(self):
        return self.image_processor_tester.prepare_image_processor_dict()

    def _check_packed_call(self, **input_kwargs):
        processor = ArlowImageProcessor(**self.image_processor_dict)
        images = self.image_processor_tester.prepare_image_inputs(equal_resolution=False, **input_kwargs)
        tester = self.image_processor_tester
        one = processor(images[0], return_tensors="pt")
        self.assertEqual(tuple(one.pixel_values.shape), (tester.packed_rows(images[:1]), PATCH_DIM))
        batch = processor(images, return_tensors="pt")
        self.assertEqual(tuple(batch.pixel_values.shape), (tester.packed_rows(images), PATCH_DIM))
        self.assertEqual(tuple(batch.image_grid_thw.shape), (tester.batch_size, 3))
        self.assertEqual(int(batch.image_grid_thw.prod(-1).sum()), batch.pixel_values.shape[0])

    def test_call_pil(self):
        self._check_packed_call()

    def test_call_numpy(self):
        self._check_packed_call(numpify=True)

    def test_call_pytorch(self):
        self._check_packed_call(torchify=True)

    def test_call_numpy_4_channels(self):
        self.skipTest("the encoder's patch rows hold exactly 3 channels (C*Tp*P*P = 1176); 4-channel images are "
                      "converted to RGB (do_convert_rgb) or refused with a clear error")

    def test_image_processor_save_load_with_autoimageprocessor(self):
        if image_common.AutoImageProcessor is not AutoImageProcessor:
            self.skipTest("transformers 5.17-5.18 export a torchvision-only placeholder as transformers."
                          "AutoImageProcessor (the real class, which arlow.auto registers with, loads it: "
                          "test_processing.py)")
        super().test_image_processor_save_load_with_autoimageprocessor()

    def test_new_models_require_torchvision_backend(self):
        self.skipTest("Arlow never requires torchvision (pyproject); its image processor is the PIL/numpy backend")
