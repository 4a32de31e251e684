"""Where pretraining images and videos come from: random-access lists of items with optional labels.

Image sources (``len``, ``load(i) -> RGB PIL image``, ``name(i)``, ``labels``):

* :class:`ImageList` - a plain list of ``path_or_image`` or ``(path_or_image, label)`` (also what linear-probe /
  k-NN evaluation uses); :meth:`ImageList.from_folder` reads an ImageNet tree ``root/class/x.jpg`` (labels =
  sorted class folders) or a flat/nested folder (no labels).
* :class:`HFImageDataset` - a Hugging Face ``datasets`` dataset saved with ``save_to_disk``.
* :class:`TarShards` - webdataset-style ``.tar`` shards (``key.jpg`` + optional ``key.cls``); members are indexed
  once so samples can be read in any order.

Video source: :class:`VideoList` - ``(path, label)`` items; :meth:`VideoList.from_folder` (UCF101 tree
``root/class/x.avi``) and :meth:`VideoList.from_list_file` (one ``path [label]`` per line).

Nothing here decides *which* item is read: the pipeline (:mod:`arlow.pretrain.data`) does. A file that cannot be
decoded raises :class:`~arlow.data.clips.UnreadableMediaError` with the reason, for the pipeline to skip.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from ..processing.media import load_image
from .clips import UnreadableMediaError, read_clip

__all__ = [
    "IMAGE_EXTENSIONS", "TAR_IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "ImageSource", "ImageList", "HFImageDataset",
    "TarShards", "VideoList", "image_source", "video_source", "first_readable", "expand_shards", "builtin_media",
    "resolve_builtin",
]

logger = logging.getLogger("arlow.pretrain.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg")
_LABEL_EXTENSIONS = ("cls", "cls.txt", "label", "label.txt")


def _decode_image(data, name: str) -> Image.Image:
    """Path, bytes, array or PIL image -> decoded 8-bit RGB (the image processor's loader and RGB policy);
    ``UnreadableMediaError`` with the reason when it cannot be decoded."""
    if isinstance(data, (bytes, bytearray)) and not data:
        raise UnreadableMediaError(f"image {name} is empty (0 bytes)")
    if isinstance(data, str) and os.path.isfile(data) and os.path.getsize(data) == 0:
        raise UnreadableMediaError(f"image {name} is empty (0 bytes)")
    try:
        return load_image(data)
    except Exception as error:  # MediaDecodeError, MediaNotFoundError, PIL's own errors ...
        raise UnreadableMediaError(f"cannot decode image {name}: {type(error).__name__}: {error}") from error


class ImageSource(ABC):
    """Random access to images. Subclasses set ``labels`` (list of int or None) and ``classes``."""

    labels: list[int] | None = None
    classes: list[str] | None = None

    @abstractmethod
    def __len__(self) -> int:
        ...

    @abstractmethod
    def load(self, index: int) -> Image.Image:
        """The image at ``index`` as a decoded RGB PIL image (``UnreadableMediaError`` if it cannot be)."""
        ...

    @abstractmethod
    def name(self, index: int) -> str:
        """Where the image at ``index`` comes from (a path, ``shard.tar:member``, ``dataset[row]``)."""
        ...

    def label(self, index: int) -> int | None:
        return None if self.labels is None else self.labels[index]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, labels={'yes' if self.labels is not None else 'no'})"


def _split_items(items, what: str):
    """``[x, (x, label), ...]`` -> (xs, labels or None); labels must be given for all items or for none."""
    values, labels = [], []
    for item in items:
        if isinstance(item, tuple):
            if len(item) != 2:
                raise ValueError(f"{what} items are `x` or `(x, label)` pairs, got a tuple of length {len(item)}")
            values.append(item[0])
            labels.append(item[1])
        else:
            values.append(item)
            labels.append(None)
    given = [label is not None for label in labels]
    if any(given) and not all(given):
        raise ValueError(f"give a label for every {what} item or for none ({sum(given)} of {len(given)} have one)")
    return values, ([int(label) for label in labels] if all(given) and labels else None)


def _scan(root: Path, extensions: Sequence[str], what: str) -> tuple[list[str], list[int] | None, list[str] | None]:
    """Files under ``root`` with one of ``extensions``; ImageNet/UCF101 labels when all lie in class folders."""
    if not root.is_dir():
        raise ValueError(f"{what} folder {root} does not exist or is not a directory")
    files = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(Path(folder) / n for n in sorted(names)
                     if not n.startswith(".") and n.lower().endswith(tuple(extensions)))
    if not files:
        raise ValueError(
            f"no {what} files found under {root}; accepted extensions: {', '.join(extensions)} "
            f"(layout root/class/file or a flat folder)"
        )
    relative = [f.relative_to(root) for f in files]
    if all(len(r.parts) == 2 for r in relative):  # root/class/file: the class folder is the label
        classes = sorted({r.parts[0] for r in relative})
        lookup = {c: i for i, c in enumerate(classes)}
        return [str(f) for f in files], [lookup[r.parts[0]] for r in relative], classes
    return [str(f) for f in files], None, None


class ImageList(ImageSource):
    """Images given as paths, bytes, PIL images or uint8 arrays, optionally with integer labels.

    Args:
        items: ``[x, ...]`` or ``[(x, label), ...]``.
        classes: optional class names (``classes[label]``).
    """

    def __init__(self, items: Sequence, classes: Sequence[str] | None = None):
        self.items, self.labels = _split_items(items, "image")
        if not self.items:
            raise ValueError("ImageList needs at least one image")
        self.items = [str(x) if isinstance(x, os.PathLike) else x for x in self.items]
        self.classes = list(classes) if classes is not None else None

    @classmethod
    def from_folder(cls, root) -> "ImageList":
        """All images under ``root`` (sorted). ``root/class/x.jpg`` everywhere -> labelled by sorted class name."""
        files, labels, classes = _scan(Path(root), IMAGE_EXTENSIONS, "image")
        return cls(list(zip(files, labels)) if labels is not None else files, classes)

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> Image.Image:
        return _decode_image(self.items[index], self.name(index))

    def name(self, index: int) -> str:
        item = self.items[index]
        return item if isinstance(item, str) else f"<in-memory image {index}>"


class HFImageDataset(ImageSource):
    """A ``datasets`` dataset saved on local disk (``Dataset.save_to_disk``), read with ``load_from_disk``.

    Args:
        path: the folder given to ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``).
        image_column: column with the images (``Image`` feature, encoded bytes, or file paths).
        label_column: integer label column; ``"auto"`` uses ``"label"`` when present, ``None`` means no labels.
        split: the split of a ``DatasetDict`` (``"train"`` by default).
    """

    def __init__(self, path, image_column: str = "image", label_column: str | None = "auto", split: str = "train"):
        import datasets

        self.path = str(path)
        dataset = datasets.load_from_disk(self.path)
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"{self.path} holds splits {list(dataset)}; choose one with split=")
            dataset = dataset[split]
        if image_column not in dataset.column_names:
            raise ValueError(f"{self.path} has no column {image_column!r}; columns: {dataset.column_names}")
        if label_column == "auto":
            label_column = "label" if "label" in dataset.column_names else None
        elif label_column is not None and label_column not in dataset.column_names:
            raise ValueError(f"{self.path} has no label column {label_column!r}; columns: {dataset.column_names}")
        if len(dataset) == 0:
            raise ValueError(f"the dataset at {self.path} has no rows")
        if isinstance(dataset.features[image_column], datasets.Image):
            # decode ourselves: a corrupt row then raises our error with the row number, like any other file
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.image_column = image_column
        self.dataset = dataset.select_columns([image_column])
        if label_column is not None:
            self.labels = [int(v) for v in dataset[label_column]]
            feature = dataset.features[label_column]
            self.classes = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> Image.Image:
        value = self.dataset[int(index)][self.image_column]
        if isinstance(value, dict):  # Image(decode=False): {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if value is None:
            raise UnreadableMediaError(f"{self.name(index)} holds no image (empty cell)")
        return _decode_image(value, self.name(index))

    def name(self, index: int) -> str:
        return f"{self.path}[{int(index)}]"


def expand_shards(spec) -> list[str]:
    """Shard list from a path, a list of paths, a glob (``*.tar``) or a brace range (``data-{000..099}.tar``)."""
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in expand_shards(s)]
    spec = str(spec)
    match = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if match:
        first, last = match.group(1), match.group(2)
        width = len(first)
        return [p for i in range(int(first), int(last) + 1)
                for p in expand_shards(spec[:match.start()] + str(i).zfill(width) + spec[match.end():])]
    match = re.search(r"\{([^{}]*,[^{}]*)\}", spec)
    if match:
        return [p for option in match.group(1).split(",")
                for p in expand_shards(spec[:match.start()] + option + spec[match.end():])]
    if any(c in spec for c in "*?["):
        found = sorted(glob.glob(spec))
        if not found:
            raise ValueError(f"no files match {spec}")
        return found
    return [spec]


class TarShards(ImageSource):
    """Images in webdataset-style tar shards: members ``key.jpg|jpeg|png|webp`` (+ ``key.cls`` integer label).

    The shards are indexed once (member offsets), then any sample is read with one seek, so shuffling and
    resuming work as for a folder. A shard that ends early (truncated download) keeps the samples before the
    damage; the problem is logged and listed in ``problems``.
    """

    def __init__(self, shards):
        self.shards = expand_shards(shards)
        if not self.shards:
            raise ValueError("TarShards needs at least one .tar shard")
        self.entries: list[tuple[int, int, int, str]] = []  # (shard, offset, size, member name)
        labels: list[int | None] = []
        self.problems: list[str] = []
        for shard_index, shard in enumerate(self.shards):
            if not os.path.isfile(shard):
                raise ValueError(f"tar shard {shard} does not exist")
            images, shard_labels = self._index(shard_index, shard)
            for key in sorted(images):
                self.entries.append(images[key])
                labels.append(shard_labels.get(key))
        if not self.entries:
            raise ValueError(
                f"no images found in {len(self.shards)} tar shard(s) ({self.shards[0]} ...); members must be named "
                f"key.{{{','.join(TAR_IMAGE_EXTENSIONS)}}}"
                + (f"; problems: {'; '.join(self.problems)}" if self.problems else "")
            )
        if all(label is not None for label in labels):
            self.labels = [int(label) for label in labels]

    def _index(self, shard_index: int, shard: str):
        images: dict[str, tuple[int, int, int, str]] = {}
        labels: dict[str, int] = {}
        try:
            with tarfile.open(shard, mode="r:") as tar, open(shard, "rb") as raw:
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, _, base = member.name.rpartition("/")
                    stem, dot, extension = base.partition(".")
                    if not dot:
                        continue
                    key = f"{folder}/{stem}" if folder else stem
                    extension = extension.lower()
                    if extension in TAR_IMAGE_EXTENSIONS:
                        images[key] = (shard_index, member.offset_data, member.size, member.name)
                    elif extension in _LABEL_EXTENSIONS:
                        raw.seek(member.offset_data)
                        text = raw.read(member.size).decode("utf-8", "replace").strip()
                        if re.fullmatch(r"-?\d+", text):
                            labels[key] = int(text)
        except (tarfile.TarError, EOFError, OSError) as error:
            message = f"tar shard {shard} is damaged after {len(images)} images: {type(error).__name__}: {error}"
            self.problems.append(message)
            logger.warning(message)
        return images, labels

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, index: int) -> Image.Image:
        shard, offset, size, _ = self.entries[index]
        try:
            with open(self.shards[shard], "rb") as raw:
                raw.seek(offset)
                data = raw.read(size)
        except OSError as error:
            raise UnreadableMediaError(f"cannot read {self.name(index)}: {error}") from error
        if len(data) != size:
            raise UnreadableMediaError(f"{self.name(index)} is truncated: {len(data)} of {size} bytes")
        return _decode_image(data, self.name(index))

    def name(self, index: int) -> str:
        shard, _, _, member = self.entries[index]
        return f"{self.shards[shard]}:{member}"


class VideoList:
    """Video files, optionally with integer labels; clips are decoded with PyAV (:mod:`arlow.data.clips`).

    Args:
        items: ``[path, ...]`` or ``[(path, label), ...]``.
        classes: optional class names.
    """

    def __init__(self, items: Sequence, classes: Sequence[str] | None = None):
        paths, self.labels = _split_items(items, "video")
        if not paths:
            raise ValueError("VideoList needs at least one video")
        self.paths = [str(p) for p in paths]
        self.classes = list(classes) if classes is not None else None

    @classmethod
    def from_folder(cls, root) -> "VideoList":
        """All videos under ``root`` (sorted). ``root/class/x.avi`` everywhere (UCF101) -> labelled by class."""
        files, labels, classes = _scan(Path(root), VIDEO_EXTENSIONS, "video")
        return cls(list(zip(files, labels)) if labels is not None else files, classes)

    @classmethod
    def from_list_file(cls, list_file, root=None) -> "VideoList":
        """One video per line: ``path`` or ``path label`` (space, tab or comma before the label).

        Relative paths are taken from ``root`` (default: the list file's folder). Blank lines and ``#`` comments
        are ignored. Labels are kept as written (UCF101's ``trainlist01.txt`` counts classes from 1).
        """
        list_file = Path(list_file)
        if not list_file.is_file():
            raise ValueError(f"video list file {list_file} does not exist")
        base = Path(root) if root is not None else list_file.parent
        items = []
        for number, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            path, label = line, None
            parts = re.split(r"\s*,\s*|\s+", line)
            if len(parts) >= 2 and re.fullmatch(r"-?\d+", parts[-1]):
                label = int(parts[-1])
                path = line[: line.rstrip().rfind(parts[-1])].rstrip(" \t,")
            path = str(base / path) if not os.path.isabs(path) else path
            items.append((path, label) if label is not None else path)
        if not items:
            raise ValueError(f"video list file {list_file} lists no videos")
        return cls(items)

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, index: int) -> str:
        return self.paths[index]

    def label(self, index: int) -> int | None:
        return None if self.labels is None else self.labels[index]

    def load_clip(self, index: int, num_frames: int, *, stride: int | None = None, fps: float | None = None,
                  rng: np.random.Generator | None = None) -> tuple[list[Image.Image], list[int]]:
        """``num_frames`` RGB frames of video ``index`` and their frame indices (``UnreadableMediaError``)."""
        path = self.paths[index]
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise UnreadableMediaError(f"video {path} is empty (0 bytes)")
        if not os.path.isfile(path):
            raise UnreadableMediaError(f"video {path} does not exist")
        return read_clip(path, num_frames, stride=stride, fps=fps, rng=rng)

    def __repr__(self) -> str:
        return f"VideoList({len(self)} videos, labels={'yes' if self.labels is not None else 'no'})"


def image_source(spec, **kwargs) -> ImageSource:
    """An image source from a folder, a saved ``datasets`` folder, ``.tar`` shard(s) / glob / brace range, or a
    list of ``path_or_image`` / ``(path_or_image, label)``. ``kwargs`` go to :class:`HFImageDataset`."""
    if isinstance(spec, ImageSource):
        return spec
    if isinstance(spec, (list, tuple)):
        if spec and all(isinstance(s, (str, os.PathLike)) and str(s).endswith(".tar") for s in spec):
            return TarShards(list(spec))
        return ImageList(spec)
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        if any((path / marker).is_file() for marker in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return HFImageDataset(path, **kwargs)
        tars = sorted(str(p) for p in path.glob("*.tar"))
        if tars and not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*")):
            return TarShards(tars)
        return ImageList.from_folder(path)
    if text.endswith(".tar") or "{" in text or any(c in text for c in "*?["):
        return TarShards(text)
    if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        return ImageList([text])
    if not path.exists():
        raise ValueError(f"image source {text} does not exist: give an existing folder, datasets folder, .tar "
                         f"shard(s) or image file")
    raise ValueError(
        f"cannot tell what image source {text!r} is: give a folder of images (root/class/x.jpg or flat), a folder "
        f"saved by datasets' save_to_disk, .tar shard(s) (path, glob or data-{{000..009}}.tar), or a list of paths"
    )


def video_source(spec) -> VideoList:
    """A video source from a folder (UCF101 layout or flat), a list file (``.txt``/``.csv``/``.lst``), one video
    file, or a list of ``path`` / ``(path, label)``."""
    if isinstance(spec, VideoList):
        return spec
    if isinstance(spec, (list, tuple)):
        return VideoList(spec)
    path = Path(str(spec))
    if not path.exists():
        raise ValueError(f"video source {path} does not exist: give an existing folder, list file or video file")
    if path.is_dir():
        return VideoList.from_folder(path)
    if path.suffix.lower() in (".txt", ".csv", ".lst", ".list"):
        return VideoList.from_list_file(path)
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        return VideoList([str(path)])
    raise ValueError(
        f"cannot tell what video source {str(spec)!r} is: give a folder of videos (root/class/x.mp4 or flat), a list "
        f"file (.txt/.csv: one `path [label]` per line), a video file, or a list of paths"
    )


def first_readable(source, load, limit: int | None = None) -> int:
    """Index of the first item that ``load(i)`` decodes; ``ValueError`` listing the reasons if none does."""
    reasons = []
    count = len(source) if limit is None else min(limit, len(source))
    for index in range(count):
        try:
            load(index)
            return index
        except UnreadableMediaError as error:
            reasons.append(str(error))
    shown = "; ".join(reasons[:5]) + (f"; ... ({len(reasons) - 5} more)" if len(reasons) > 5 else "")
    raise ValueError(f"{source!r}: none of the {count} files checked could be read: {shown}")


def builtin_media() -> tuple[list[str], list[str]]:
    """``(image_paths, video_paths)`` of the real photos and Big Buck Bunny clips shipped in ``arlow/assets``.

    CC0 / public-domain / CC-BY photos from scikit-image and scikit-learn and a CC-BY 3.0 clip (Blender
    Foundation); licences and attribution in ``assets/media/LICENSES.md``.
    """
    root = Path(str(resources.files("arlow").joinpath("assets", "media")))
    images = sorted(str(p) for p in (root / "images").iterdir() if p.suffix.lower() == ".jpg")
    videos = sorted(str(p) for p in (root / "videos").iterdir() if p.suffix.lower() == ".mp4")
    if not images or not videos:
        raise FileNotFoundError(f"the built-in media are missing from {root}: reinstall arlow")
    return images, videos


def resolve_builtin(images, videos) -> tuple:
    """A recipe's ``data.images`` / ``data.videos`` with the word ``"builtin"`` replaced by the shipped media lists
    (:func:`builtin_media`); any other value (a path, a list, ``None``) is returned as it is."""
    builtin_images, builtin_videos = builtin_media()
    return (builtin_images if images == "builtin" else images, builtin_videos if videos == "builtin" else videos)
