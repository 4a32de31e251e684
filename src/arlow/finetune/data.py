"""The stage 2/3 data pipeline: records -> encoded examples -> length-grouped micro-batches, sharded by rank,
deterministic and resumable.

How an epoch is laid out (a pure function of ``seed``, the epoch number, the rank and the data):

1. The records are visited in a per-epoch permutation (``shuffle``), and rank ``r`` of ``W`` takes every ``W``-th
   of them (``r, r + W, ...``): disjoint shards that together cover the epoch.
2. A rank's records are cut into *windows* of ``group_size``. A window is encoded (in DataLoader workers when
   ``num_workers > 0``), its examples are sorted by length and packed greedily into micro-batches whose padded size
   ``rows x longest`` stays within ``tokens_per_batch`` (and at most ``max_batch_size`` rows) - length-grouped
   batching, so padding is small and a micro-batch costs about the same whatever it holds (design D7). The
   micro-batches of a window are then shuffled, so lengths do not march in order through training.
3. Examples that cannot be used are dropped and counted, with a warning naming the record and the reason: too long
   to truncate without cutting a placeholder run, no target token, unreadable record or media (see
   :mod:`arlow.finetune.examples`). With ``overflow="error"`` an overlong example stops the run instead.

``state_dict()`` is ``{"epoch", "window", "offset"}`` (the next micro-batch of this rank) plus the drop counters and
a fingerprint of the settings that shape the plan; resuming re-encodes the current window (encoding is
deterministic) and skips the micro-batches already used. Ranks may get a different number of micro-batches per
epoch; each simply continues with its next epoch, so the engine's steps stay aligned.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from .collate import DummyVision, collate_examples
from .examples import Example, ExampleEncoder, RejectedExample
from .sources import RecordSource, record_source

__all__ = ["FinetuneData", "pack_by_length"]

logger = logging.getLogger("arlow.finetune.data")

_ORDER, _BATCH_ORDER = 21, 22  # tags that keep the random streams of one (seed, epoch) apart


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def pack_by_length(lengths: list[int], tokens_per_batch: int, max_batch_size: int) -> list[list[int]]:
    """Group example indices into micro-batches: sort by length (longest first), then fill each micro-batch while
    ``rows x longest <= tokens_per_batch`` and ``rows <= max_batch_size``. An example longer than the budget gets a
    micro-batch of its own. Returns lists of indices into ``lengths``."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        padded = (len(current) + 1) * max(longest, lengths[i])
        fits = current and len(current) < max_batch_size and padded <= tokens_per_batch
        if current and not fits:
            groups.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, lengths[i])
    if current:
        groups.append(current)
    return groups


class _WindowMaker:
    """Encodes one window and packs it; runs in DataLoader workers (picklable, no counters)."""

    def __init__(self, pipeline: "FinetuneData"):
        for name in ("source", "encoder", "tokens_per_batch", "max_batch_size", "seed", "pad_token_id", "dummy",
                     "overflow", "cache"):
            setattr(self, name, getattr(pipeline, name))

    def __getitem__(self, task):
        epoch, window, indices, cursor = task
        examples: list[Example] = []
        dropped: list[tuple[str, str, str]] = []  # (record name, kind, reason)
        for index in indices:
            index = int(index)
            if self.cache is not None and index in self.cache:
                examples.append(self.cache[index])
                continue
            try:
                examples.append(self.encoder(self.source.record(index)))
                if self.cache is not None:
                    self.cache[index] = examples[-1]
            except RejectedExample as err:
                if err.kind == "overflow" and self.overflow == "error":
                    raise ValueError(f"{self.source.name(index)}: {err} (data.overflow='error'; set it to 'drop' to "
                                     "skip such examples with a warning)") from None
                dropped.append((self.source.name(index), err.kind, str(err)))
            except (ValueError, OSError, KeyError, TypeError) as err:  # malformed record
                dropped.append((self.source.name(index), "unreadable", f"{type(err).__name__}: {err}"))
        groups = pack_by_length([len(ex) for ex in examples], self.tokens_per_batch, self.max_batch_size)
        order = _rng(self.seed, epoch, window, _BATCH_ORDER).permutation(len(groups))
        batches = [collate_examples([examples[i] for i in groups[g]], self.pad_token_id, self.dummy) for g in order]
        return batches, dropped, cursor


def _identity(x):
    return x


class FinetuneData:
    """Length-grouped micro-batches of encoded examples for :class:`arlow.training.Trainer`.

    Args:
        source: records (anything :func:`arlow.finetune.sources.record_source` accepts).
        encoder: an :class:`~arlow.finetune.examples.ExampleEncoder` (caption or chat).
        tokens_per_batch: budget of padded text tokens (``rows x longest``) per micro-batch.
        max_batch_size: most examples per micro-batch.
        group_size: examples per length-grouping window (larger: less padding, more memory and latency).
        shuffle: per-epoch random record order (``False``: source order).
        seed: seeds the record order and the micro-batch order.
        rank, world_size: this process's shard.
        num_workers: DataLoader worker processes that load media and encode (0: in this process).
        prefetch_factor: windows each worker prepares ahead.
        epochs: stop after this many epochs (``None``: for ever; the engine stops at ``max_steps``).
        overflow: ``"drop"`` (skip examples too long to truncate safely, with a counted warning) or ``"error"``.
        dummy_vision: add the zero-weighted dummy image row to micro-batches without media (see
            :mod:`arlow.finetune.collate`); keep it on for distributed runs.
        media_root: folder that relative media paths are resolved against (default: a JSON-lines file's folder).
        cache: keep every encoded example in memory after its first epoch (small data sets trained for many
            epochs; needs ``num_workers=0``). Encoding is deterministic, so the batches are the same either way.
    """

    def __init__(self, source, encoder: ExampleEncoder, *, tokens_per_batch: int = 4096, max_batch_size: int = 32,
                 group_size: int = 256, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, prefetch_factor: int = 2, epochs: int | None = None, overflow: str = "drop",
                 dummy_vision: bool = True, media_root=None, cache: bool = False):
        if not isinstance(encoder, ExampleEncoder):
            raise ValueError(f"encoder must be an ExampleEncoder, got {type(encoder).__name__}")
        for name, value, low in (("tokens_per_batch", tokens_per_batch, 1), ("max_batch_size", max_batch_size, 1),
                                 ("group_size", group_size, 1), ("world_size", world_size, 1),
                                 ("num_workers", num_workers, 0), ("seed", seed, 0)):
            if int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None, got {epochs}")
        if cache and num_workers:
            raise ValueError("cache=True keeps examples in this process; it needs num_workers=0")
        if overflow not in ("drop", "error"):
            raise ValueError(f"overflow must be 'drop' or 'error', got {overflow!r}")
        self.source: RecordSource = record_source(source, media_root)
        if len(self.source) < world_size:
            raise ValueError(f"{len(self.source)} records cannot be shared by {world_size} processes: every process "
                             "needs at least one")
        self.encoder = encoder
        self.tokens_per_batch, self.max_batch_size, self.group_size = tokens_per_batch, max_batch_size, group_size
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.epochs, self.overflow = epochs, overflow
        tokenizer = encoder.processor.tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else encoder.eos_id
        self.dummy = DummyVision.from_processor(encoder.processor) if dummy_vision else None
        self.cache: dict[int, Example] | None = {} if cache else None
        self.num_dropped = 0
        self.dropped_by_kind: Counter = Counter()
        self._epoch, self._window, self._offset = 0, 0, 0

    # ---- the plan -------------------------------------------------------------------------------------------

    def shard(self, epoch: int) -> np.ndarray:
        """Record indices of this rank in ``epoch``, in visiting order."""
        n = len(self.source)
        order = _rng(self.seed, epoch, _ORDER).permutation(n) if self.shuffle else np.arange(n)
        return order[self.rank::self.world_size]

    def windows(self, epoch: int) -> int:
        return -(-len(self.shard(epoch)) // self.group_size)

    def _tasks(self) -> Iterator[tuple]:
        """``(epoch, window, record indices, cursor of the window)`` from the saved position on."""
        epoch, window = self._epoch, self._window
        while self.epochs is None or epoch < self.epochs:
            shard = self.shard(epoch)
            for w in range(window, self.windows(epoch)):
                yield epoch, w, shard[w * self.group_size:(w + 1) * self.group_size], (epoch, w)
            epoch, window = epoch + 1, 0

    # ---- iteration ----------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        """Micro-batches of this rank from the current position on (see ``state_dict``)."""
        maker = _WindowMaker(self)
        if self.num_workers == 0:
            results = (maker[task] for task in self._tasks())
        else:
            results = iter(DataLoader(
                maker, batch_size=None, sampler=self._tasks(), num_workers=self.num_workers,
                collate_fn=_identity, prefetch_factor=self.prefetch_factor,
                generator=torch.Generator().manual_seed(self.seed),  # leave the training RNG alone
            ))
        barren = 0  # consecutive windows that gave no example at all
        for batches, dropped, (epoch, window) in results:
            skip = self._offset if (epoch, window) == (self._epoch, self._window) else 0
            self._report(dropped, skip)
            barren = 0 if batches else barren + 1
            if barren > self.windows(epoch):  # a whole epoch's worth of windows: nothing will ever come
                raise ValueError(self._nothing_left_message())
            for offset in range(skip, len(batches)):
                self._epoch, self._window, self._offset = epoch, window, offset + 1
                yield batches[offset]
            self._epoch, self._window, self._offset = epoch, window + 1, 0
            if self._window >= self.windows(epoch):
                self._epoch, self._window = epoch + 1, 0

    def _report(self, dropped: list[tuple[str, str, str]], skip: int) -> None:
        if skip:  # a resumed window: its drops were counted before the checkpoint
            return
        for name, kind, reason in dropped:
            self.num_dropped += 1
            self.dropped_by_kind[kind] += 1
            logger.warning("dropped example %s (%s): %s [%d dropped so far on this rank: %s]", name, kind, reason,
                           self.num_dropped, dict(self.dropped_by_kind))

    def _nothing_left_message(self) -> str:
        return (f"every example of an epoch was dropped on rank {self.rank} ({dict(self.dropped_by_kind)}); see the "
                "warnings above for the reasons (max_length too small? wrong data format for this stage?)")

    # ---- resume ---------------------------------------------------------------------------------------------

    def _fingerprint(self) -> dict:
        return {"num_records": len(self.source), "seed": self.seed, "shuffle": self.shuffle,
                "group_size": self.group_size, "tokens_per_batch": self.tokens_per_batch,
                "max_batch_size": self.max_batch_size, "max_length": self.encoder.max_length,
                "task": self.encoder.task, "world_size": self.world_size, "rank": self.rank}

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "window": self._window, "offset": self._offset,
                "num_dropped": self.num_dropped, "dropped_by_kind": dict(self.dropped_by_kind),
                "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` was taken; ``ValueError`` if the data or its settings changed."""
        if not isinstance(state, dict) or not {"epoch", "window", "offset"} <= set(state):
            raise ValueError(f"expected a FinetuneData.state_dict() with epoch/window/offset, got {state!r}")
        saved, ours = state.get("fingerprint", {}), self._fingerprint()
        changed = {k: (saved.get(k), v) for k, v in ours.items() if k in saved and saved[k] != v}
        if changed:
            detail = ", ".join(f"{k}: saved {a!r} now {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"cannot resume the data position: the data settings changed ({detail}); resume with "
                             "the same data and settings")
        self._epoch, self._window, self._offset = int(state["epoch"]), int(state["window"]), int(state["offset"])
        self.num_dropped = int(state.get("num_dropped", 0))
        self.dropped_by_kind = Counter(state.get("dropped_by_kind", {}))

    def __repr__(self) -> str:
        return (f"FinetuneData({self.source!r}, task={self.encoder.task}, tokens_per_batch={self.tokens_per_batch}, "
                f"max_batch_size={self.max_batch_size}, rank={self.rank}/{self.world_size})")
