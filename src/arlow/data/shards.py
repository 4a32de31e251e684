"""Prepared shards: webdataset-style tar files plus a JSON index per shard and one manifest per set.

Layout of a prepared set (written by ``arlow prepare-data``, one set for images and one for videos)::

    manifest.json          {"format": "arlow-shards", "version": 1, "kind": "image"|"video", "classes": [...],
                            "labelled": bool, "num_samples": n, "settings": {...},
                            "shards": [{"name": "shard-000000.tar", "index": "shard-000000.json",
                                        "num_samples": k, "bytes": b}, ...]}
    shard-000000.tar       members key.jpg (or key.mp4) and key.cls, in index order
    shard-000000.json      {"shard": ..., "bytes": b, "samples": [{"key", "member", "offset", "size", "label",
                            "width", "height", (videos:) "frames", "fps", "source_fps"}, ...],
                            "inputs": [...], "skipped": [[name, reason], ...]}

The manifest alone (per-shard sample counts) is enough to plan an epoch, so start-up never lists samples or scans
a tar; a stream reads a shard's index when it opens the shard. A set lives at a *location*: a local folder, a URL
that webdataset's ``gopen`` opens (``http://``, ``https://``, ``gs://``, ``hf://`` ... through ``curl``/CLI
pipes), any other ``scheme://`` through fsspec (``s3://`` with ``s3fs`` installed), or ``pipe:COMMAND`` where
``COMMAND`` writes the file named by ``{path}`` to stdout (``pipe:aws s3 cp s3://bucket/set/{path} -``).

The pure functions here decide *which* shards and samples a stream reads (:func:`deal`, :func:`shuffle_order`);
:class:`ShardStream` reads them, in that order, holding at most ``buffer`` raw samples.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import urlparse

import numpy as np

__all__ = ["FORMAT", "MANIFEST", "ShardSet", "ShardStream", "is_prepared", "open_location", "deal",
           "shuffle_order", "shard_index_name", "sample_key"]

FORMAT, VERSION, MANIFEST = "arlow-shards", 1, "manifest.json"


def shard_index_name(shard_name: str) -> str:
    """``shard-000000.tar`` -> ``shard-000000.json``."""
    return shard_name[: -len(".tar")] + ".json" if shard_name.endswith(".tar") else shard_name + ".json"


def sample_key(member_name: str) -> tuple[str, str]:
    """``dir/key.ext.more`` -> ``("dir/key", "ext.more")`` (webdataset's rule: the key ends at the first dot of
    the base name)."""
    folder, _, base = member_name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _is_url(location: str) -> bool:
    return location.startswith("pipe:") or "://" in location


def is_prepared(spec) -> bool:
    """Whether ``spec`` names a prepared set: a URL / ``pipe:`` location, or a folder holding ``manifest.json``."""
    if not isinstance(spec, (str, os.PathLike)):
        return False
    text = str(spec)
    return _is_url(text) or os.path.isfile(os.path.join(text, MANIFEST))


def open_location(location: str, name: str):
    """A binary, read-only, sequential file object for ``name`` inside the set at ``location``."""
    location = str(location)
    if location.startswith("pipe:"):
        if "{path}" not in location:
            raise ValueError(f"a pipe: location needs a {{path}} placeholder for the file name, e.g. "
                             f"'pipe:aws s3 cp s3://bucket/set/{{path}} -'; got {location!r}")
        from webdataset.gopen import gopen

        return gopen(location.replace("{path}", name))
    if not _is_url(location):
        return open(os.path.join(location, name), "rb")
    url = location.rstrip("/") + "/" + name
    from webdataset.gopen import gopen_schemes

    if urlparse(url).scheme in gopen_schemes and urlparse(url).scheme != "__default__":
        from webdataset.gopen import gopen

        return gopen(url)
    import fsspec

    return fsspec.open(url, "rb").open()


def _read_json(location: str, name: str) -> dict:
    try:
        with open_location(location, name) as stream:
            data = stream.read()
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {name} of the prepared set {location}: {type(error).__name__}: {error}"
                         ) from error
    try:
        return json.loads(data)
    except ValueError as error:
        raise ValueError(f"{name} of the prepared set {location} is not valid JSON ({len(data)} bytes read; "
                         f"an empty read usually means the file or URL does not exist): {error}") from error


@dataclass
class ShardSet:
    """A prepared set, from its manifest: where it is, its kind, shard names and per-shard sample counts.

    Small and picklable (DataLoader workers get a copy); the per-sample index is read by :class:`ShardStream`.
    """

    location: str
    kind: str
    names: list[str]
    counts: list[int]
    classes: list[str] | None
    labelled: bool
    settings: dict

    @classmethod
    def open(cls, location) -> "ShardSet":
        location = str(location)
        manifest = _read_json(location, MANIFEST)
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{location}/{MANIFEST} is not an arlow prepared set (format "
                             f"{manifest.get('format')!r}); write one with `arlow prepare-data`")
        if manifest.get("version") != VERSION:
            raise ValueError(f"{location}: prepared-set version {manifest.get('version')} is not supported "
                             f"(this arlow reads version {VERSION}); prepare the data again")
        shards = [s for s in manifest["shards"] if s["num_samples"] > 0]
        if not shards:
            raise ValueError(f"the prepared set {location} holds no samples")
        return cls(location, manifest["kind"], [s["name"] for s in shards], [int(s["num_samples"]) for s in shards],
                   manifest.get("classes"), bool(manifest.get("labelled")), manifest.get("settings", {}))

    def __len__(self) -> int:
        return sum(self.counts)

    @property
    def labels(self):
        """Truthy when every sample has a label (what the pipeline asks of a source before adding ``labels``)."""
        return True if self.labelled else None

    def read_index(self, shard: int) -> dict:
        return _read_json(self.location, shard_index_name(self.names[shard]))

    def __repr__(self) -> str:
        return (f"ShardSet({self.location!r}, {self.kind}, {len(self)} samples in {len(self.names)} shards, "
                f"labels={'yes' if self.labelled else 'no'})")


def deal(num_shards: int, stream: int, num_streams: int, order: np.ndarray | None = None) -> list[int]:
    """The shards stream ``stream`` of ``num_streams`` reads: ``order[stream::num_streams]``.

    ``order`` is the epoch's shard order (default: 0..num_shards-1). The streams' shares are disjoint and together
    complete. With fewer shards than streams, stream ``s`` reads shard ``order[s % num_shards]`` (shared): use
    that only for a small secondary source (the video set of a mix), never to split a primary one.
    """
    order = np.arange(num_shards) if order is None else np.asarray(order)
    if num_shards >= num_streams:
        return [int(i) for i in order[stream::num_streams]]
    return [int(order[stream % num_shards])]


def shuffle_order(n: int, buffer: int, rng: np.random.Generator | None) -> np.ndarray:
    """Emission order of a shuffle buffer of ``buffer`` items over a stream of ``n`` items: ``out[t]`` = input
    position of the ``t``-th item emitted (a permutation of ``0..n-1``).

    The buffer fills with the first ``buffer`` inputs; each step emits a uniformly chosen buffered item and puts
    the next input in its place; when the inputs run out the rest leave in random order. A pure function of
    ``(n, buffer, rng state)``, so a reader can skip to any output position; ``out[t] < t + buffer`` always, so a
    reader never holds more than ``buffer`` items. ``rng=None`` or ``buffer <= 1``: the identity.
    """
    if rng is None or buffer <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    draws = rng.random(n)
    held = list(range(min(buffer, n)))
    incoming = len(held)
    out = np.empty(n, dtype=np.int64)
    for t in range(n):
        j = int(draws[t] * len(held))
        out[t] = held[j]
        if incoming < n:
            held[j] = incoming
            incoming += 1
        else:
            held[j] = held[-1]
            held.pop()
    return out


class ShardStream:
    """Samples of shards ``shards`` of ``shard_set`` (read in that order, as one input stream), emitted in the
    order ``order`` (see :func:`shuffle_order`), from output position ``start`` on.

    Yields ``(entry, data)``: the sample's index entry (``key``, ``label``, sizes ...) and the raw bytes of its
    media member. Resuming at ``start`` reads from the first shard that still holds a sample to emit; samples
    already emitted are read past (their bytes are not kept), never decoded.
    """

    def __init__(self, shard_set: ShardSet, shards: Sequence[int], order: np.ndarray, start: int = 0):
        self.shard_set, self.shards, self.order, self.start = shard_set, list(shards), order, start
        counts = [shard_set.counts[s] for s in self.shards]
        self.first_input = np.cumsum([0] + counts)  # input position of each shard's first sample
        if len(order) != self.first_input[-1]:
            raise ValueError(f"order has {len(order)} positions for {self.first_input[-1]} samples")

    def __iter__(self) -> Iterator[tuple[dict, bytes]]:
        pending = self.order[self.start:]
        if not len(pending):
            return
        needed = np.zeros(len(self.order), dtype=bool)
        needed[pending] = True
        held: dict[int, tuple[dict, bytes]] = {}
        inputs = self._inputs(int(pending.min()), needed)
        for position in pending:
            while position not in held:
                number, entry, data = next(inputs)
                held[number] = (entry, data)
            yield held.pop(int(position))

    def _inputs(self, first: int, needed: np.ndarray):
        """``(input position, entry, bytes)`` of the needed inputs from ``first`` on, shard after shard."""
        begin = int(np.searchsorted(self.first_input, first, side="right")) - 1
        for slot in range(begin, len(self.shards)):
            base = int(self.first_input[slot])
            if not needed[base: int(self.first_input[slot + 1])].any():
                continue
            shard = self.shards[slot]
            entries = self.shard_set.read_index(shard)["samples"]
            if len(entries) != self.shard_set.counts[shard]:
                raise ValueError(f"{self.shard_set.location}: the index of {self.shard_set.names[shard]} lists "
                                 f"{len(entries)} samples, the manifest {self.shard_set.counts[shard]}")
            for number, (entry, data) in enumerate(self._members(shard, entries, needed[base: base + len(entries)])):
                if data is not None:
                    yield base + number, entry, data

    def _members(self, shard: int, entries: list[dict], needed: np.ndarray):
        """``(entry, bytes or None)`` for every sample of a shard, streamed from its tar in index order."""
        name = f"{self.shard_set.location}/{self.shard_set.names[shard]}"
        done = 0
        with open_location(self.shard_set.location, self.shard_set.names[shard]) as raw, \
                tarfile.open(fileobj=raw, mode="r|") as tar:
            for member in tar:
                if done == len(entries):
                    break
                entry = entries[done]
                if member.name != entry["member"]:
                    if sample_key(member.name)[0] in (entry["key"], entries[done - 1]["key"] if done else None):
                        continue  # a sidecar member (key.cls): the label is in the index
                    raise ValueError(f"{name}: member {member.name} where the index expects {entry['member']}; "
                                     f"the shard and its index do not match (prepare the data again)")
                data = tar.extractfile(member).read() if needed[done] else None
                yield entry, data
                done += 1
        if done != len(entries):
            raise ValueError(f"{name} ended after {done} of {len(entries)} samples (truncated shard or download)")
