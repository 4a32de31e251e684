"""Where fine-tuning records come from: random access to plain dicts, whatever the storage.

A *record* is one training example as a dict. Two kinds are understood (see :mod:`arlow.finetune.examples`):

* a caption pair (stage 2): ``{"image": media, "caption": str}`` or ``{"video": media, "caption": str}``;
* a conversation (stage 3): ``{"messages": [{"role": ..., "content": str | [blocks]}, ...]}`` in the processor's
  chat format (``{"type": "image", "path": ...}``, ``{"type": "video", "path": ...}``, ``{"type": "text", ...}``
  blocks), or LLaVA's ``{"conversations": [{"from": "human", "value": "<image>\\n..."}, ...], "image": ...}``.

Storage (:func:`record_source` picks one from what it is given):

* :class:`JsonLines` - one JSON object per line (``.jsonl``); relative media paths are resolved against the file's
  folder (or ``media_root``). Lines are indexed by byte offset, so the file is never held in memory.
* :class:`HFDataset` - a Hugging Face ``datasets`` dataset saved with ``save_to_disk``; ``Image`` columns arrive as
  PIL images, relative paths are resolved against ``media_root``.
* :class:`TarSamples` - webdataset shards: members ``KEY.EXT`` grouped by ``KEY`` (the basename up to its first
  dot). ``KEY.json`` holds a record; a bare ``KEY.txt`` is a caption. Media members (``KEY.jpg``, ``KEY.0.png``,
  ``KEY.mp4`` ...) are handed over as bytes: a media reference in the record that names a member's extension
  (``"image": "jpg"``, ``{"type": "image", "path": "1.png"}``) gets that member, and a reference with no source at
  all (``{"type": "image"}``, or a caption record without ``image``/``video``) gets the sample's media in order.
* :class:`RecordList` - an in-memory list of dicts (the Python API and tests).
"""

from __future__ import annotations

import json
import os
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data.sources import expand_shards

__all__ = [
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "RecordSource",
    "RecordList",
    "JsonLines",
    "HFDataset",
    "TarSamples",
    "ConcatSource",
    "record_source",
]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
VIDEO_EXTENSIONS = ("mp4", "avi", "mkv", "webm", "mov", "m4v")
_MEDIA_KEYS = ("image", "images", "video", "videos")


class RecordSource(ABC):
    """Random access to records. ``record(i)`` returns a fresh dict (callers may modify it)."""

    @abstractmethod
    def __len__(self) -> int:
        ...

    @abstractmethod
    def record(self, index: int) -> dict:
        ...

    @abstractmethod
    def name(self, index: int) -> str:
        """Where record ``index`` comes from (``file.jsonl:12``, ``shard.tar:KEY``, ``dataset[3]``)."""
        ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} records)"


def _resolve_paths(value: Any, root: Path | None) -> Any:
    """Make relative media paths absolute against ``root`` (recursively through blocks and lists)."""
    if root is None:
        return value
    if isinstance(value, str):
        if "://" in value or value.startswith("data:") or os.path.isabs(value):
            return value
        return str(root / value)
    if isinstance(value, list):
        return [_resolve_paths(v, root) for v in value]
    return value


def resolve_media(record: dict, root: Path | None) -> dict:
    """``record`` with every media reference (top-level ``image``/``video``/lists, and ``path``/``url``/``image``/
    ``video`` keys of media blocks) resolved against ``root``."""
    out = dict(record)
    for key in _MEDIA_KEYS:
        if key in out:
            out[key] = _resolve_paths(out[key], root)
    for conv_key in ("messages", "conversations"):
        if isinstance(out.get(conv_key), list):
            out[conv_key] = [_resolve_message(m, root) for m in out[conv_key]]
    return out


def _resolve_message(message: Any, root: Path | None) -> Any:
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return message
    blocks = []
    for block in message["content"]:
        if isinstance(block, dict) and block.get("type") in ("image", "video"):
            block = dict(block)
            for key in ("path", "url", "image", "video"):
                if isinstance(block.get(key), str):
                    block[key] = _resolve_paths(block[key], root)
        blocks.append(block)
    return {**message, "content": blocks}


class RecordList(RecordSource):
    """Records given as a list of dicts; relative media paths resolve against ``media_root`` when given."""

    def __init__(self, records: Sequence[dict], media_root: str | Path | None = None):
        self.records = list(records)
        if not self.records:
            raise ValueError("RecordList needs at least one record")
        bad = [i for i, r in enumerate(self.records) if not isinstance(r, dict)]
        if bad:
            raise ValueError(f"records must be dicts; items {bad[:5]} are not")
        self.root = Path(media_root) if media_root is not None else None

    def __len__(self) -> int:
        return len(self.records)

    def record(self, index: int) -> dict:
        return resolve_media(self.records[index], self.root)

    def name(self, index: int) -> str:
        return f"records[{index}]"


class JsonLines(RecordSource):
    """A ``.jsonl`` file: one record per non-empty line, read by byte offset on demand."""

    def __init__(self, path: str | Path, media_root: str | Path | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"JSON-lines file {self.path} does not exist")
        self.root = Path(media_root) if media_root is not None else self.path.resolve().parent
        offsets = []
        with open(self.path, "rb") as handle:
            position = 0
            for line in handle:
                if line.strip():
                    offsets.append(position)
                position += len(line)
        if not offsets:
            raise ValueError(f"{self.path} holds no records (one JSON object per line expected)")
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets)

    def record(self, index: int) -> dict:
        with open(self.path, "rb") as handle:
            handle.seek(self.offsets[index])
            line = handle.readline()
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.name(index)} is not valid JSON: {err}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{self.name(index)} must hold a JSON object, got {type(record).__name__}")
        return resolve_media(record, self.root)

    def name(self, index: int) -> str:
        return f"{self.path}:{index + 1}"


def _drop_none(value: Any) -> Any:
    """``datasets`` unifies struct fields across rows, filling absent keys with None: remove them again."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


class HFDataset(RecordSource):
    """A ``datasets`` dataset saved with ``save_to_disk`` (one split). Rows are records."""

    def __init__(self, path: str | Path, media_root: str | Path | None = None, split: str | None = None):
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split is None:
                if len(loaded) != 1:
                    raise ValueError(f"{path} holds splits {list(loaded)}; name one with split=")
                split = next(iter(loaded))
            loaded = loaded[split]
        if len(loaded) == 0:
            raise ValueError(f"the dataset at {path} is empty")
        self.dataset = loaded
        self.path = str(path)
        self.root = Path(media_root) if media_root is not None else None

    def __len__(self) -> int:
        return len(self.dataset)

    def record(self, index: int) -> dict:
        return resolve_media(_drop_none(dict(self.dataset[index])), self.root)

    def name(self, index: int) -> str:
        return f"{self.path}[{index}]"


class TarSamples(RecordSource):
    """webdataset shards read by random access: each ``KEY`` with a ``.json`` or ``.txt`` member is a record."""

    def __init__(self, shards, media_root: str | Path | None = None):
        self.shards = expand_shards(shards)
        self.root = Path(media_root) if media_root is not None else None
        self.samples: list[tuple[int, str, dict[str, tuple[int, int]]]] = []  # (shard, key, {ext: (offset, size)})
        for shard_index, shard in enumerate(self.shards):
            if not Path(shard).is_file():
                raise ValueError(f"tar shard {shard} does not exist")
            groups: dict[str, dict[str, tuple[int, int]]] = {}
            order: list[str] = []
            with tarfile.open(shard) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, base = os.path.split(member.name)
                    if "." not in base or base.startswith("."):
                        continue
                    stem, ext = base.split(".", 1)
                    key = f"{folder}/{stem}" if folder else stem
                    if key not in groups:
                        groups[key] = {}
                        order.append(key)
                    groups[key][ext.lower()] = (member.offset_data, member.size)
            for key in order:
                if "json" in groups[key] or "txt" in groups[key]:
                    self.samples.append((shard_index, key, groups[key]))
        if not self.samples:
            raise ValueError(f"no samples with a .json or .txt member in {self.shards}")

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, shard: int, span: tuple[int, int]) -> bytes:
        with open(self.shards[shard], "rb") as handle:
            handle.seek(span[0])
            return handle.read(span[1])

    def record(self, index: int) -> dict:
        shard, key, members = self.samples[index]
        if "json" in members:
            record = json.loads(self._read(shard, members["json"]))
            if not isinstance(record, dict):
                raise ValueError(f"{self.name(index)}.json must hold a JSON object")
        else:
            record = {"caption": self._read(shard, members["txt"]).decode("utf-8").strip()}
        media = {ext: span for ext, span in sorted(members.items())
                 if ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS}
        return _attach_members(record, media, lambda span: self._read(shard, span), self.root)

    def name(self, index: int) -> str:
        shard, key, _ = self.samples[index]
        return f"{self.shards[shard]}:{key}"


def _attach_members(record: dict, media: dict[str, tuple[int, int]], read, root: Path | None) -> dict:
    """Replace member references in ``record`` by the members' bytes (see the module docstring)."""
    kinds = {ext: ("image" if ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS else "video") for ext in media}
    unused = {"image": [e for e in media if kinds[e] == "image"], "video": [e for e in media if kinds[e] == "video"]}

    def take(kind: str, ref: Any) -> Any:
        if isinstance(ref, str) and ref.lower() in media:
            if ref.lower() in unused[kinds[ref.lower()]]:
                unused[kinds[ref.lower()]].remove(ref.lower())
            return read(media[ref.lower()])
        if ref is None:
            if not unused[kind]:
                raise ValueError(f"the record asks for another {kind} but the sample has no unused {kind} member")
            return read(media[unused[kind].pop(0)])
        return _resolve_paths(ref, root)

    out = dict(record)
    for conv_key in ("messages", "conversations"):
        if isinstance(out.get(conv_key), list):
            messages = []
            for message in out[conv_key]:
                if isinstance(message, dict) and isinstance(message.get("content"), list):
                    blocks = []
                    for block in message["content"]:
                        if isinstance(block, dict) and block.get("type") in ("image", "video"):
                            kind = block["type"]
                            ref = next((block[k] for k in ("path", "url", kind) if k in block), None)
                            block = {k: v for k, v in block.items() if k not in ("path", "url", kind)}
                            block[kind] = take(kind, ref)
                        blocks.append(block)
                    message = {**message, "content": blocks}
                messages.append(message)
            out[conv_key] = messages
    for kind in ("image", "video"):
        if kind in out:
            out[kind] = take(kind, out[kind])
        plural = kind + "s"
        if plural in out and isinstance(out[plural], list):
            out[plural] = [take(kind, ref) for ref in out[plural]]
    is_caption = "caption" in out and not any(k in out for k in ("messages", "conversations"))
    if is_caption and not any(k in out for k in _MEDIA_KEYS):
        for kind in ("image", "video"):  # a caption record's media is the sample's one media member
            if unused[kind]:
                out[kind] = take(kind, None)
                break
    return out


class ConcatSource(RecordSource):
    """Several sources one after the other."""

    def __init__(self, sources: Sequence[RecordSource]):
        self.sources = list(sources)
        self.starts = []
        total = 0
        for source in self.sources:
            self.starts.append(total)
            total += len(source)
        self.total = total

    def __len__(self) -> int:
        return self.total

    def _locate(self, index: int) -> tuple[RecordSource, int]:
        if not 0 <= index < self.total:
            raise IndexError(index)
        for source, start in zip(reversed(self.sources), reversed(self.starts)):
            if index >= start:
                return source, index - start
        raise IndexError(index)

    def record(self, index: int) -> dict:
        source, local = self._locate(index)
        return source.record(local)

    def name(self, index: int) -> str:
        source, local = self._locate(index)
        return source.name(local)


def _is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _starts_with_array(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip()
    return head.startswith(b"[")


def record_source(spec: Any, media_root: str | Path | None = None) -> RecordSource:
    """A :class:`RecordSource` from a ``.jsonl`` path, a saved ``datasets`` folder, tar shard(s) (path, glob or
    brace range ``data-{000..009}.tar``), a list of record dicts, a list of such specs, or a source itself."""
    if isinstance(spec, RecordSource):
        return spec
    if isinstance(spec, (list, tuple)):
        if spec and all(isinstance(s, dict) for s in spec):
            return RecordList(spec, media_root)
        if not spec:
            raise ValueError("an empty list of data sources")
        sources = [record_source(s, media_root) for s in spec]
        return sources[0] if len(sources) == 1 else ConcatSource(sources)
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(f"cannot read fine-tuning records from {type(spec).__name__}; give a .jsonl file, a saved "
                         "datasets folder, .tar shards or a list of dicts")
    text = str(spec)
    path = Path(text)
    if _is_hf_dataset_dir(path):
        return HFDataset(path, media_root)
    if text.endswith(".tar") or any(c in text for c in "*?[{"):
        return TarSamples(text, media_root)
    if path.suffix == ".json" and path.is_file() and _starts_with_array(path):
        # LLaVA-style: one JSON array of records
        records = json.loads(path.read_text(encoding="utf-8"))
        return RecordList(records, media_root if media_root is not None else path.resolve().parent)
    if path.suffix in (".jsonl", ".json") or path.is_file():
        return JsonLines(path, media_root)
    if path.is_dir():
        raise ValueError(f"{path} is a folder but not a saved `datasets` dataset (no dataset_info.json/state.json)")
    raise ValueError(f"data source {text!r} does not exist; give a .jsonl file, a saved datasets folder, or .tar "
                     "shards (path, glob or {000..009} range)")
