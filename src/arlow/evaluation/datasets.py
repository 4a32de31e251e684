"""Labelled image datasets for frozen-feature evaluation, and their seeded train/test split.

Three forms are accepted (:func:`labelled_images`):

* a class-folder tree ``root/<class>/<image>`` (ImageNet layout; the folder name is the class);
* a Hugging Face ``datasets`` dataset saved with ``save_to_disk`` (an image column and an integer label column);
* a CSV file of ``path,label`` rows (optional header; relative paths are taken from the CSV's folder; labels may be
  names or integers).

Images are read through the pretraining sources (:mod:`arlow.data.sources`), so decoding, the RGB policy and
the "unreadable file" errors are the ones the encoder was pretrained with. Class names, not label numbers, tie a
train split to a test split, so two folders with the same class folders line up whatever else they hold.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.sources import HFImageDataset, ImageList, ImageSource

__all__ = ["LabelledImages", "labelled_images", "read_csv", "stratified_split", "class_index"]

_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_PATH_HEADERS = ("path", "file", "filename", "file_name", "image", "image_path", "filepath")
_LABEL_HEADERS = ("label", "class", "target", "category", "y")
FORMS = ("a class-folder tree root/<class>/<image>", "a folder saved by datasets' save_to_disk",
         "a CSV file of path,label rows")


@dataclass
class LabelledImages:
    """``source.load(indices[i])`` is item ``i``; ``names[i]`` is its class name; ``where`` describes the origin."""

    source: ImageSource
    names: list[str]
    where: str
    indices: np.ndarray = field(default=None)

    def __post_init__(self):
        if self.indices is None:
            self.indices = np.arange(len(self.names))
        if len(self.indices) != len(self.names):
            raise ValueError("LabelledImages: one class name per selected item")

    def __len__(self) -> int:
        return len(self.names)

    def select(self, positions) -> "LabelledImages":
        """The items at ``positions`` (indexes into this dataset)."""
        positions = np.asarray(positions, dtype=np.int64)
        return LabelledImages(self.source, [self.names[p] for p in positions], self.where, self.indices[positions])


def read_csv(path) -> ImageList:
    """An ``ImageList`` of ``(path, class index)`` from a ``path,label`` CSV; ``classes`` holds the label names."""
    path = Path(path)
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        for number, row in enumerate(csv.reader(handle), 1):
            row = [cell.strip() for cell in row]
            if not row or not any(row) or row[0].startswith("#"):
                continue
            if len(row) < 2 or not row[0] or not row[1]:
                raise ValueError(f"{path}:{number}: expected `path,label`, got {','.join(row)!r}")
            if not rows and row[0].lower() in _PATH_HEADERS and row[1].lower() in _LABEL_HEADERS:
                continue  # header line
            rows.append((row[0], row[1]))
    if not rows:
        raise ValueError(f"{path} lists no images: expected one `path,label` row per image (a header is optional)")
    names = _sorted_names({label for _, label in rows})
    lookup = {name: i for i, name in enumerate(names)}
    items = [(str(p if Path(p).is_absolute() else path.parent / p), lookup[label]) for p, label in rows]
    return ImageList(items, classes=names)


def _sorted_names(names) -> list[str]:
    """Numeric order when every name is an integer ("2" < "10"), else alphabetical."""
    names = list(names)
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def labelled_images(spec, image_column: str = "image", label_column: str = "label",
                    split: str = "train") -> LabelledImages:
    """Open a labelled dataset in any of the three forms (see the module docstring).

    Raises ``ValueError`` naming the accepted forms when ``spec`` is none of them, when the dataset has no images,
    or when it has no labels.
    """
    path = Path(str(spec))
    if path.is_file() and path.suffix.lower() in (".csv", ".txt", ".tsv"):
        source = read_csv(path)
    elif path.is_dir() and any((path / marker).is_file() for marker in _HF_MARKERS):
        source = HFImageDataset(path, image_column=image_column, label_column=label_column, split=split)
    elif path.is_dir():
        source = ImageList.from_folder(path)  # ValueError when it holds no image files
        if source.labels is None:
            raise ValueError(f"{path} holds images but not in class folders: expected root/<class>/<image> (every "
                             f"image exactly one folder below {path}), or use a CSV of path,label")
    else:
        raise ValueError(f"{spec!r} is not a labelled image dataset: expected {', '.join(FORMS[:-1])} or "
                         f"{FORMS[-1]}")
    if source.labels is None:
        raise ValueError(f"{spec} has no labels (label column {label_column!r})")
    classes = source.classes
    names = [classes[label] if classes is not None else str(label) for label in source.labels]
    return LabelledImages(source, [str(n) for n in names], str(spec))


def class_index(train: LabelledImages, test: LabelledImages | None = None):
    """``(classes, train_labels (n,), test_labels (m,) or None)``: contiguous ids of the training class names.

    Raises ``ValueError`` when the training items hold fewer than two classes, or the test split has a class the
    training split lacks.
    """
    classes = _sorted_names(set(train.names))
    if len(train) == 0:
        raise ValueError(f"{train.where}: the training split holds no images")
    if len(classes) < 2:
        raise ValueError(f"{train.where}: found a single class ({classes[0]!r}); classification needs at least two "
                         f"classes (one class folder per class, or two different labels in the CSV/dataset)")
    lookup = {name: i for i, name in enumerate(classes)}
    train_labels = np.array([lookup[n] for n in train.names], dtype=np.int64)
    if test is None:
        return classes, train_labels, None
    unknown = sorted(set(test.names) - set(classes))
    if unknown:
        raise ValueError(f"{test.where}: the test split has classes the training split lacks: {unknown[:10]}")
    return classes, train_labels, np.array([lookup[n] for n in test.names], dtype=np.int64)


def stratified_split(names: list[str], test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split keeping class proportions: ``(train_positions, test_positions)``, each sorted.

    Every class with at least two items puts ``round(n_c * test_fraction)`` of them (at least one, at most
    ``n_c - 1``) in the test split; a class with one item stays in training.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    names_array = np.array(names, dtype=object)
    test = []
    for name in _sorted_names(set(names)):
        members = np.flatnonzero(names_array == name)
        if len(members) < 2:
            continue
        count = min(max(1, round(len(members) * test_fraction)), len(members) - 1)
        test.extend(rng.permutation(members)[:count].tolist())
    if not test:
        raise ValueError(f"cannot split {len(names)} images into train and test: need a class with at least two "
                         f"images (or give separate train and test datasets)")
    is_test = np.zeros(len(names), dtype=bool)
    is_test[test] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)
