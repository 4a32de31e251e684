"""The Arlow tokenizer: a fast byte-level BPE with the chat and multimodal special tokens.

Special tokens (all are single ids that text never splits):

==========================  ==============================================================
``<|endoftext|>``           end of text; also the padding token
``<|im_start|>``            opens a chat turn: ``<|im_start|>role\\n ... <|im_end|>\\n`` (ChatML)
``<|im_end|>``              closes a chat turn
``<image>`` / ``<video>``   one placeholder per vision token the encoder produces
``<|vision_start|>``        opens a run of image/video placeholders
``<|vision_end|>``          closes it
==========================  ==============================================================

The multimodal ones are named tokens (``tokenizer.image_token``, ``tokenizer.image_token_id``,
``video_token``, ``vision_start_token``, ``vision_end_token`` and their ``*_id``), stored in
``tokenizer_config.json`` and restored on load. Padding is on the left by default, as batched generation needs.

:func:`load_default_tokenizer` loads the small built-in vocabulary shipped in ``arlow/assets/tokenizer``
(8,192 ids, trained offline by ``scripts/build_default_tokenizer.py``; the four multimodal tokens are the last
four ids, which is where ``ArlowConfig`` expects them), together with the chat template.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer
from transformers.tokenization_utils_tokenizers import TokenizersBackend

__all__ = [
    "ArlowTokenizerFast",
    "load_default_tokenizer",
    "default_tokenizer_dir",
    "default_chat_template",
    "BASE_SPECIAL_TOKENS",
    "MULTIMODAL_SPECIAL_TOKENS",
    "NAMED_MULTIMODAL_TOKENS",
]

EOS_TOKEN = "<|endoftext|>"
BASE_SPECIAL_TOKENS = (EOS_TOKEN, "<|im_start|>", "<|im_end|>")
# Order matters: ArlowConfig's default ids are vocab_size-4 ... vocab_size-1 in this order.
NAMED_MULTIMODAL_TOKENS = {
    "image_token": "<image>",
    "video_token": "<video>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}
MULTIMODAL_SPECIAL_TOKENS = tuple(NAMED_MULTIMODAL_TOKENS.values())
DEFAULT_MODEL_MAX_LENGTH = 32768  # ArlowTextConfig.max_position_embeddings


class ArlowTokenizerFast(TokenizersBackend):
    """Byte-level BPE tokenizer (``tokenizers`` backend) with Arlow's special tokens and left padding.

    Load a saved one with ``ArlowTokenizerFast.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)``,
    the built-in one with :func:`load_default_tokenizer`, or wrap a ``tokenizers.Tokenizer`` with
    :meth:`from_backend`.
    """

    padding_side = "left"
    model_input_names = ["input_ids", "attention_mask"]

    @classmethod
    def from_backend(cls, backend: Tokenizer, chat_template: str | None = None,
                     model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> "ArlowTokenizerFast":
        """Wrap a trained ``tokenizers.Tokenizer`` that already contains every Arlow special token."""
        vocab = backend.get_vocab(with_added_tokens=True)
        missing = [tok for tok in BASE_SPECIAL_TOKENS + MULTIMODAL_SPECIAL_TOKENS if tok not in vocab]
        if missing:
            raise ValueError(f"the tokenizer lacks the special tokens {missing}; add them with "
                             "tokenizers.Tokenizer.add_special_tokens before wrapping it")
        return cls(
            tokenizer_object=backend,
            eos_token=EOS_TOKEN,
            pad_token=EOS_TOKEN,
            extra_special_tokens=dict(NAMED_MULTIMODAL_TOKENS),
            padding_side="left",
            model_max_length=model_max_length,
            chat_template=chat_template,
        )


    def _save_pretrained(self, save_directory, file_names, legacy_format=None, filename_prefix=None):
        # The last call's truncation/padding stay set on the Rust tokenizer; written into tokenizer.json they would
        # silently truncate every prompt after reloading. They are per-call settings, so drop them before saving.
        self.backend_tokenizer.no_truncation()
        self.backend_tokenizer.no_padding()
        return super()._save_pretrained(save_directory, file_names, legacy_format=legacy_format,
                                        filename_prefix=filename_prefix)


def default_tokenizer_dir() -> Path:
    """Folder of the built-in tokenizer (``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``)."""
    return Path(str(resources.files("arlow") / "assets" / "tokenizer"))


def default_chat_template() -> str:
    """Arlow's ChatML chat template (the text of ``assets/tokenizer/chat_template.jinja``)."""
    return (default_tokenizer_dir() / "chat_template.jinja").read_text(encoding="utf-8")


def load_default_tokenizer(**kwargs) -> ArlowTokenizerFast:
    """The built-in 8,192-id tokenizer with the chat template; nothing is downloaded.

    ``kwargs`` go to ``from_pretrained`` (e.g. ``padding_side="right"`` for training).
    """
    folder = default_tokenizer_dir()
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"the built-in tokenizer is missing from {folder}; rebuild it with "
            "`python scripts/build_default_tokenizer.py` or reinstall arlow"
        )
    return ArlowTokenizerFast.from_pretrained(str(folder), **kwargs)
