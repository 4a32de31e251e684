"""Processors: pixels to patch rows, image/video processors, media loading, tokenizer, chat template."""

from .image import ArlowImageProcessor, smart_resize
from .media import MediaDecodeError, MediaNotFoundError, VideoMetadata, load_image, load_video
from .processor import ArlowProcessor
from .tokenizer import ArlowTokenizerFast, default_chat_template, load_default_tokenizer
from .video import ArlowVideoProcessor

__all__ = [
    "ArlowImageProcessor",
    "ArlowProcessor",
    "ArlowTokenizerFast",
    "ArlowVideoProcessor",
    "MediaDecodeError",
    "MediaNotFoundError",
    "VideoMetadata",
    "default_chat_template",
    "load_default_tokenizer",
    "load_image",
    "load_video",
    "smart_resize",
]
