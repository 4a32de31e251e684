"""transformers' common tokenizer suites (``TokenizerTesterMixin``, ``TokenizersBackendTesterMixin``) run against
:class:`ArlowTokenizerFast` with the built-in vocabulary (``arlow/assets/tokenizer``).

The suites come from the installed transformers version's own test folder (see ``tests/upstream.py``). A test is
skipped here only with the reason it does not apply; anything else that fails is an Arlow bug.
"""

import tempfile
import unittest

import upstream

from arlow.processing.tokenizer import ArlowTokenizerFast, default_tokenizer_dir, load_default_tokenizer

tokenization_common = upstream.load("test_tokenization_common")
backend_mixin = upstream.load("test_tokenizers_backend_mixin")

# The suite reads tests/fixtures/sample_text.txt, which the source distribution does not ship; any English text
# of a few lines does (it is tokenized, never compared with stored ids).
SAMPLE_TEXT = """This text is a stand-in for the sample the tokenizer suites read.
It has a few sentences, with numbers such as 1,024 and 3.14, punctuation; and a second line.
Images and videos become placeholder tokens that the processor expands before tokenization."""


class ArlowTokenizerConformanceTest(tokenization_common.TokenizerTesterMixin,
                                    backend_mixin.TokenizersBackendTesterMixin, unittest.TestCase):
    tokenizer_class = ArlowTokenizerFast
    from_pretrained_id = str(default_tokenizer_dir())
    test_seq2seq = False  # a decoder-only vocabulary: no seq2seq target tokenization

    @classmethod
    def setUpClass(cls):
        # As TokenizerTesterMixin.setUpClass, with the sample text above instead of its fixtures file.
        cls.from_pretrained_id = [cls.from_pretrained_id] if isinstance(cls.from_pretrained_id, str) \
            else cls.from_pretrained_id
        cls.tokenizers_list = [(cls.tokenizer_class, name, {}) for name in cls.from_pretrained_id]
        cls._data = SAMPLE_TEXT
        cls.tmpdirname = tempfile.mkdtemp()
        load_default_tokenizer().save_pretrained(cls.tmpdirname)
