"""Rebuild ``src/arlow/assets/tokenizer/``: the built-in byte-level BPE tokenizer that needs no download.

The tokenizer is trained offline, in a few seconds, on English text that is already on the machine:

* the docstrings of the Python standard library (parsed with ``ast``, nothing is imported);
* README / documentation / package METADATA text (``*.md``, ``*.rst``, ``METADATA``, ``README*``) inside the
  installed site-packages.

Files are read in sorted order and capped (per file and in total), so a rebuild on the same environment
gives the same vocabulary. The result is small on purpose (about 8k tokens): it is a working default for
tests, demos and from-scratch training, not a replacement for a large pretrained vocabulary.

Layout of the vocabulary (``VOCAB_SIZE`` = 8192 ids):

* ids 0, 1, 2: ``<|endoftext|>`` (eos and pad), ``<|im_start|>``, ``<|im_end|>``;
* then the 256 byte symbols and the learned merges;
* the last four ids: ``<image>``, ``<video>``, ``<|vision_start|>``, ``<|vision_end|>``. ``ArlowConfig`` puts its
  multimodal token ids at ``vocab_size - 4 ... vocab_size - 1`` in this order, so a model config with
  ``vocab_size=8192`` matches this tokenizer without setting any id by hand.

The chat template (``chat_template.jinja``, in the same folder) is not generated: it is the source file and is
kept as it is.

Usage: ``python scripts/build_default_tokenizer.py [--out src/arlow/assets/tokenizer] [--vocab-size 8192]``
"""

from __future__ import annotations

import argparse
import ast
import sys
import sysconfig
import time
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from arlow.processing.tokenizer import (  # noqa: E402  (needs the src path above)
    BASE_SPECIAL_TOKENS,
    MULTIMODAL_SPECIAL_TOKENS,
    ArlowTokenizerFast,
)

VOCAB_SIZE = 8192
MAX_FILE_CHARS = 200_000
MAX_TOTAL_CHARS = 12_000_000
DOC_SUFFIXES = {".md", ".rst", ".txt"}


def stdlib_docstrings() -> list[str]:
    """Module, class and function docstrings of the standard library (tests and site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("site-packages") or "test" in rel or "idlelib" in rel:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    texts.append(doc)
    return texts


def package_documents() -> list[str]:
    """README/documentation/METADATA text of the installed packages."""
    root = Path(sysconfig.get_paths()["purelib"])
    texts = []
    for path in sorted(root.rglob("*")):
        name = path.name
        wanted = name == "METADATA" or name.startswith("README") or path.suffix in DOC_SUFFIXES
        if not wanted or not path.is_file() or "test" in path.as_posix().lower():
            continue
        try:
            text = path.read_text(encoding="utf-8")[:MAX_FILE_CHARS]
        except (UnicodeDecodeError, OSError):
            continue
        letters = sum(ch.isalpha() for ch in text)
        if len(text) > 500 and letters > 0.5 * len(text):  # skip data tables, requirement lists, etc.
            texts.append(text)
    return texts


def corpus() -> list[str]:
    texts, total = [], 0
    for text in stdlib_docstrings() + package_documents():
        if total + len(text) > MAX_TOTAL_CHARS:
            break
        texts.append(text)
        total += len(text)
    return texts


def build(vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train the byte-level BPE; the multimodal tokens are appended last (see the module docstring)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    # Digits are split one by one (numbers tokenise uniformly), then GPT-2 style byte-level words.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(MULTIMODAL_SPECIAL_TOKENS),
        min_frequency=2,
        special_tokens=list(BASE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = corpus()
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.add_special_tokens(list(MULTIMODAL_SPECIAL_TOKENS))
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"trained {tok.get_vocab_size()} tokens instead of {vocab_size}: the corpus is too small")
    return tok


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "src" / "arlow" / "assets" / "tokenizer")
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    backend = build(args.vocab_size)
    template_file = args.out / "chat_template.jinja"
    template = template_file.read_text(encoding="utf-8") if template_file.exists() else None
    tokenizer = ArlowTokenizerFast.from_backend(backend, chat_template=template)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(args.out)
    size = (args.out / "tokenizer.json").stat().st_size
    print(f"wrote {args.out} ({tokenizer.vocab_size} base + added = {len(tokenizer)} tokens, tokenizer.json "
          f"{size / 1e6:.2f} MB) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
