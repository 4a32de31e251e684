"""The MAE pretraining data pipeline: sources -> per-sample mixing -> augmentation -> patches -> token-budget
micro-batches, in DataLoader workers, deterministic, sharded by rank and resumable.

How an epoch is laid out (all of it a pure function of ``seed`` and the epoch number, computed identically on
every rank, so nothing depends on the number of workers or processes):

1. Images are visited in a per-epoch permutation; before each sample a draw ``u_k`` (from ``(seed, epoch)``)
   makes sample ``k`` a video clip when ``u_k < video_prob``. The epoch ends when every image has been used
   once; videos come from their own per-epoch permutation, recycled if the epoch needs more. Without images an
   epoch is one pass over the videos.
2. Every sample's cost in patch rows is known before decoding (the crop has a fixed size; a clip always has
   ``clip_frames`` frames), so the epoch is packed into micro-batches up front (:func:`pack_by_budget`).
3. The stream of micro-batches (epoch after epoch) is dealt round-robin to the ranks: rank ``r`` of ``W`` gets
   micro-batches ``r, r + W, r + 2W, ...`` - disjoint, complete, and the same count on every rank (the last
   round of a finite run may borrow up to ``W - 1`` micro-batches of the next epoch).
4. A worker builds a micro-batch from its list of samples: decode, crop/flip with a generator seeded by
   ``(seed, epoch, k)``, normalise, patchify. A file that cannot be read is replaced by the next readable item
   of the same source (same cost), and reported to the main process, which logs the path and reason once and
   counts it (``num_skipped`` replacements, ``skipped_files`` distinct files). A file found unreadable is not
   decoded again: the main process and every worker remember it (and so does ``state_dict()``), so later epochs
   replace it at once, with the same result.

``state_dict()`` is ``{"epoch", "position"}``: the global micro-batch where the next round starts, identical on
every rank (so a run may even resume with a different number of processes), plus a fingerprint of everything
that shapes the plan, checked by ``load_state_dict``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..configuration import ArlowVisionConfig
from ..data.augment import center_crop_box, crop_frames, frames_to_tensor, image_normalisation, random_resized_crop_box
from ..data.clips import UnreadableMediaError
from ..data.sources import ImageSource, VideoList, builtin_media, first_readable, image_source, video_source
from ..processing.patches import pad_frames, patchify
from .packing import collate_items, pack_by_budget, patch_count

__all__ = ["PretrainData", "IMAGE", "VIDEO"]

logger = logging.getLogger("arlow.pretrain.data")

IMAGE, VIDEO = 0, 1
_MAX_ATTEMPTS = 64  # unreadable files in a row before a sample gives up (the source is checked at start-up)
# tags that keep the random streams of one (seed, epoch) apart
_IMAGE_ORDER, _VIDEO_ORDER, _MIXING, _SAMPLE = 11, 12, 13, 14


def mix(n_images: int, video_prob: float, rng: np.random.Generator) -> np.ndarray:
    """``is_video (length,)`` bool: sample ``k`` is a clip when draw ``u_k < video_prob``; draws continue until
    ``n_images`` samples are images (the last sample is an image)."""
    # drawing in chunks reads the same stream as drawing all at once
    is_video = np.zeros(0, dtype=bool)
    chunk = int(n_images / (1.0 - video_prob) * 1.1) + 16
    while (~is_video).sum() < n_images:
        is_video = np.concatenate([is_video, rng.random(chunk) < video_prob])
    return is_video[: int(np.searchsorted(np.cumsum(~is_video), n_images)) + 1]


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


class _SampleMaker:
    """Turns a list of sample specs into a micro-batch; lives in DataLoader workers (picklable, stateless).

    A spec is ``(kind, source_index, epoch, k)``; the returned value is ``(batch, skipped, cursor_after)`` where
    ``skipped`` lists ``(kind, index, name, reason)`` of files that were replaced.
    """

    def __init__(self, pipeline: "PretrainData"):
        # copy the settings, not the pipeline: workers get a small object without plans or counters
        for name in ("images", "videos", "seed", "resolution", "augment", "scale", "ratio", "hflip_prob",
                     "clip_frames", "frame_stride", "clip_fps", "mean", "std", "patch_size", "temporal_patch_size",
                     "merge_size", "with_labels", "normalise"):
            setattr(self, name, getattr(pipeline, name))
        # (kind, index) -> reason of files known to be unreadable; in a worker, its own copy keeps growing
        self.unreadable = pipeline._unreadable

    def __getitem__(self, task):
        specs, cursor_after = task
        rows, grids, labels, skipped = [], [], [], []
        for kind, index, epoch, k in specs:
            item_rows, grid, label = self.make(kind, index, epoch, k, skipped)
            rows.append(item_rows)
            grids.append(grid)
            labels.append(label)
        batch = collate_items(rows, grids, labels if self.with_labels else None)
        return batch, skipped, cursor_after

    def make(self, kind: int, index: int, epoch: int, k: int, skipped: list):
        """One sample -> ``(rows (N, C*Tp*P*P), grid (3,), label)``; unreadable files are replaced and listed."""
        source = self.images if kind == IMAGE else self.videos
        attempts = min(_MAX_ATTEMPTS, len(source))
        for attempt in range(attempts):
            current = (index + attempt) % len(source)
            rng = _rng(self.seed, epoch, k, attempt, _SAMPLE)
            reason = self.unreadable.get((kind, current))
            if reason is None:
                try:
                    frames = self.load(kind, current, rng)
                except UnreadableMediaError as error:
                    reason = self.unreadable[(kind, current)] = str(error)
            if reason is not None:
                skipped.append((kind, current, source.name(current), reason))
                continue
            rows, grid = self.to_patches(frames, rng)
            return rows, grid, source.label(current)
        raise RuntimeError(
            f"{attempts} files in a row could not be read from {source!r} (last: {skipped[-1][3]}); the data "
            f"changed since start-up or is mostly unreadable: check it"
        )

    def load(self, kind: int, index: int, rng: np.random.Generator):
        if kind == IMAGE:
            return [self.images.load(index)]
        frames, _ = self.videos.load_clip(index, self.clip_frames, stride=self.frame_stride, fps=self.clip_fps,
                                          rng=rng if self.augment else None)
        return frames

    def to_patches(self, frames, rng: np.random.Generator):
        """Same crop and flip for every frame -> ``(T, 3, R, R)`` (normalised float32, or uint8 with
        ``normalise=False``) -> padded to Tp -> patch rows."""
        width, height = frames[0].size
        if self.augment:
            box = random_resized_crop_box(width, height, rng, self.scale, self.ratio)
            flip = bool(rng.random() < self.hflip_prob)
        else:
            box, flip = center_crop_box(width, height), False
        frames = crop_frames(frames, box, self.resolution, flip)
        if self.normalise:
            pixels = frames_to_tensor(frames, self.mean, self.std)
        else:  # uint8 rows, normalised on the training device (see arlow.pretrain.pixels)
            pixels = torch.from_numpy(np.stack([np.asarray(f, dtype=np.uint8) for f in frames])).permute(0, 3, 1, 2)
        # an image is Tp identical frames; a clip is padded by repeating its last frame
        return patchify(pad_frames(pixels, self.temporal_patch_size), self.patch_size, self.temporal_patch_size,
                        self.merge_size)


def _identity(x):
    return x


def _pinned(batch: dict) -> dict:
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class PretrainData:
    """Micro-batches of packed patch rows for MAE pretraining (see the module docstring for the layout).

    Args:
        images: image source (folder, saved ``datasets`` folder, tar shard(s), list, or an ``ImageSource``);
            ``None`` for video-only.
        videos: video source (folder, list file, list, or a ``VideoList``); ``None`` for images only.
        vision_config: the encoder's config, for ``patch_size``, ``temporal_patch_size``, ``spatial_merge_size``
            (defaults: 14, 2, 2).
        resolution: side of the square crop in pixels; a multiple of ``patch_size * spatial_merge_size`` (28).
        video_prob: probability that a sample is a video clip (when both sources are given).
        clip_frames: frames per clip.
        frame_stride: frames between the frames of a clip (ignored when ``clip_fps`` is set).
        clip_fps: sample clips at this many frames per second of video time instead of a frame stride.
        tokens_per_batch: budget of patch rows per micro-batch (design D7).
        augment: random resized crop + flip and random clip start; ``False``: centre crop, centred clip.
        scale, ratio, hflip_prob: random resized crop area fraction, aspect range, flip probability.
        shuffle: visit items in a per-epoch random order (``False``: source order).
        seed: seeds every random choice (orders, mixing, crops).
        rank, world_size: this process's share of the micro-batch stream.
        num_workers: DataLoader worker processes that decode and augment (0: in this process).
        prefetch_factor: micro-batches each worker prepares ahead.
        epochs: stop after this many epochs; ``None`` iterates for ever (the engine stops at ``max_steps``).
        with_labels: add ``labels (n,)``; ``None`` -> when every source in use has labels.
        check_sources: at start-up, decode items until one reads, so an unreadable source fails early.
        pin_memory: hand out micro-batches in pinned (page-locked) memory, so that the copy to the GPU runs
            without stalling the host; ``None``: when CUDA is available.
        normalise: ``pixel_values`` as float32, rescaled and normalised per channel with the image processor's
            mean/std; ``False``: the uint8 pixel values (0-255) in the same layout, a quarter of the bytes, for the
            training device to normalise (:class:`~arlow.pretrain.pixels.DeviceNormaliser`, which ``arlow
            pretrain`` uses: it sets ``False`` unless the recipe says otherwise). Either way the model sees the
            same numbers, within float rounding.
    """

    def __init__(self, images=None, videos=None, *, vision_config: ArlowVisionConfig | None = None,
                 resolution: int = 224, video_prob: float = 0.25, clip_frames: int = 16, frame_stride: int = 4,
                 clip_fps: float | None = None, tokens_per_batch: int = 4096, augment: bool = True,
                 scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 hflip_prob: float = 0.5, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, prefetch_factor: int = 2, epochs: int | None = None,
                 with_labels: bool | None = None, check_sources: bool = True, pin_memory: bool | None = None,
                 normalise: bool = True):
        if images is None and videos is None:
            raise ValueError("give an image source, a video source or both (see PretrainData.builtin() for a demo)")
        self.images, self.videos = self._open_sources(images, videos)
        vc = vision_config or ArlowVisionConfig()
        if vc.in_channels != 3:
            raise ValueError(f"the pipeline makes RGB patches; vision_config.in_channels is {vc.in_channels}")
        self.patch_size, self.temporal_patch_size, self.merge_size = (
            vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size)
        factor = self.patch_size * self.merge_size
        if resolution < factor or resolution % factor:
            lower = max(factor, resolution // factor * factor)
            raise ValueError(f"resolution must be a positive multiple of patch_size*spatial_merge_size = {factor}; "
                             f"got {resolution}, try {lower} or {lower + factor}")
        if not 0.0 <= video_prob <= 1.0:
            raise ValueError(f"video_prob must be in [0, 1], got {video_prob}")
        if video_prob == 1.0 and self.images is not None and self.videos is not None:
            raise ValueError("video_prob=1 would never use the images; pass images=None for video-only pretraining")
        if clip_frames < 1:
            raise ValueError(f"clip_frames must be >= 1, got {clip_frames}")
        if clip_fps is None and frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
        if clip_fps is not None and clip_fps <= 0:
            raise ValueError(f"clip_fps must be positive, got {clip_fps}")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        if tokens_per_batch < 1:
            raise ValueError(f"tokens_per_batch must be >= 1 patch row, got {tokens_per_batch}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None, got {epochs}")

        self.resolution, self.clip_frames = resolution, clip_frames
        self.frame_stride = None if clip_fps is not None else frame_stride
        self.clip_fps = clip_fps
        self.video_prob = video_prob if (self.images is not None and self.videos is not None) else None
        self.tokens_per_batch, self.augment, self.shuffle = tokens_per_batch, augment, shuffle
        self.scale, self.ratio, self.hflip_prob = tuple(scale), tuple(ratio), hflip_prob
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers, self.prefetch_factor, self.epochs = num_workers, prefetch_factor, epochs
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.mean, self.std = image_normalisation()
        self.normalise = bool(normalise)
        sources = [s for s in (self.images, self.videos) if s is not None]
        has_labels = all(s.labels is not None for s in sources)
        if with_labels and not has_labels:
            raise ValueError("with_labels=True but a source has no labels (folders need the root/class/file layout)")
        self.with_labels = has_labels if with_labels is None else with_labels

        side = resolution // self.patch_size
        self.image_cost = patch_count(1, side, side, 1, 1)
        self.clip_cost = patch_count(clip_frames, side, side, 1, self.temporal_patch_size)
        if check_sources:
            self._check_sources()
        biggest = max(([self.image_cost] if self.images is not None else []) +
                      ([self.clip_cost] if self.videos is not None else []))
        if biggest > tokens_per_batch:
            logger.warning("a sample costs %d patch rows, more than tokens_per_batch=%d: such samples get a "
                           "micro-batch of their own (raise tokens_per_batch to pack them)", biggest, tokens_per_batch)

        self.num_skipped = 0
        self.skipped_files: dict[str, str] = {}
        self._unreadable: dict[tuple[int, int], str] = {}
        self._epoch, self._position = 0, 0
        self._plans: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()

    def _open_sources(self, images, videos) -> tuple[ImageSource | None, VideoList | None]:
        return (image_source(images) if images is not None else None,
                video_source(videos) if videos is not None else None)

    def _check_sources(self) -> None:
        """Decode items until one reads, so an unreadable source fails at start-up."""
        if self.images is not None:
            first_readable(self.images, self.images.load)
        if self.videos is not None:
            first_readable(self.videos, lambda i: self.videos.load_clip(i, 1, stride=1))

    @classmethod
    def builtin(cls, **kwargs) -> "PretrainData":
        """The shipped photos and Big Buck Bunny clips (:func:`builtin_media`): the offline demo's data."""
        images, videos = builtin_media()
        return cls(images, videos, **kwargs)

    # ---- the plan: a pure function of (seed, epoch) ----------------------------------------------------------

    def _order(self, size: int, *key: int) -> np.ndarray:
        return _rng(self.seed, *key).permutation(size) if self.shuffle else np.arange(size)

    def epoch_samples(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(kinds, source_indices)`` of every sample of ``epoch``, in order (``kinds``: IMAGE=0 / VIDEO=1)."""
        if self.images is None:
            order = self._order(len(self.videos), epoch, _VIDEO_ORDER, 0)
            return np.full(len(order), VIDEO, dtype=np.int8), order
        n_images = len(self.images)
        image_order = self._order(n_images, epoch, _IMAGE_ORDER)
        if self.video_prob is None or self.video_prob == 0.0:
            return np.full(n_images, IMAGE, dtype=np.int8), image_order
        is_video = mix(n_images, self.video_prob, _rng(self.seed, epoch, _MIXING))
        length = len(is_video)
        kinds = is_video.astype(np.int8)
        indices = np.empty(length, dtype=np.int64)
        indices[~is_video] = image_order
        n_clips = int(is_video.sum())
        n_videos = len(self.videos)
        cycles = [self._order(n_videos, epoch, _VIDEO_ORDER, c) for c in range(-(-n_clips // n_videos))]
        indices[is_video] = np.concatenate(cycles)[:n_clips] if cycles else []
        return kinds, indices

    def _plan(self, epoch: int):
        """``(kinds, indices, offsets, costs)``: micro-batch ``b`` of ``epoch`` is samples
        ``offsets[b]:offsets[b+1]``."""
        if epoch not in self._plans:
            kinds, indices = self.epoch_samples(epoch)
            costs = np.where(kinds == VIDEO, self.clip_cost, self.image_cost)
            groups = pack_by_budget(costs.tolist(), self.tokens_per_batch)
            offsets = np.cumsum([0] + [len(g) for g in groups])
            self._plans[epoch] = (kinds, indices, offsets, costs)
            while len(self._plans) > 3:
                self._plans.popitem(last=False)
        return self._plans[epoch]

    def epoch_size(self, epoch: int = 0) -> int:
        """Micro-batches in ``epoch`` over all ranks (each rank gets about ``1 / world_size`` of them)."""
        return len(self._plan(epoch)[2]) - 1

    def micro_batch_samples(self, epoch: int, batch: int) -> list[tuple[int, int, int, int]]:
        """Specs ``(kind, source_index, epoch, k)`` of micro-batch ``batch`` of ``epoch`` (global numbering)."""
        kinds, indices, offsets, _ = self._plan(epoch)
        return [(int(kinds[k]), int(indices[k]), epoch, k) for k in range(offsets[batch], offsets[batch + 1])]

    def _advance(self, epoch: int, position: int, steps: int) -> tuple[int, int]:
        position += steps
        while position >= self.epoch_size(epoch):
            position -= self.epoch_size(epoch)
            epoch += 1
        return epoch, position

    def _tasks(self) -> Iterator[tuple[list, tuple[int, int]]]:
        """This rank's micro-batches from the saved cursor on: ``(specs, cursor after this round)``."""
        epoch, position = self._epoch, self._position
        while self.epochs is None or epoch < self.epochs:
            mine = self._advance(epoch, position, self.rank)
            after = self._advance(epoch, position, self.world_size)
            yield self.micro_batch_samples(*mine), after
            epoch, position = after

    def sample(self, kind: int, index: int, epoch: int = 0, k: int = 0):
        """One sample as a worker makes it: ``(rows (N, C*Tp*P*P), grid_thw (3,), label, skipped)`` for item
        ``index`` of the image (``IMAGE``) or video (``VIDEO``) source, augmented as sample ``k`` of ``epoch``."""
        if (self.images if kind == IMAGE else self.videos) is None:
            raise ValueError(f"this pipeline has no {'image' if kind == IMAGE else 'video'} source")
        skipped: list = []
        rows, grid, label = _SampleMaker(self).make(kind, index, epoch, k, skipped)
        return rows, grid, label, skipped

    # ---- iteration ----------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        """Micro-batches for this rank, continuing from the current position (see ``state_dict``)."""
        maker = _SampleMaker(self)
        if self.num_workers == 0:
            results = (maker[task] for task in self._tasks())
            if self.pin_memory:
                results = ((_pinned(batch), skipped, after) for batch, skipped, after in results)
        else:
            # One loader serves every epoch (the task stream runs on across epoch boundaries), so the workers
            # live for the whole run without persistent_workers.
            loader = DataLoader(
                maker, batch_size=None, sampler=self._tasks(), num_workers=self.num_workers,
                collate_fn=_identity, prefetch_factor=self.prefetch_factor, pin_memory=self.pin_memory,
                # a private generator: the loader's worker seeds must not consume the training RNG
                generator=torch.Generator().manual_seed(self.seed),
            )
            results = iter(loader)
        for batch, skipped, after in results:
            for kind, index, name, reason in skipped:
                self.num_skipped += 1
                self._unreadable[(kind, index)] = reason
                if name not in self.skipped_files:
                    self.skipped_files[name] = reason
                    logger.warning("skipped unreadable file %s: %s (%d distinct files skipped so far; the next "
                                   "readable item of the same source takes its place, in every epoch)", name, reason,
                                   len(self.skipped_files))
            self._epoch, self._position = after
            yield batch

    # ---- resume ---------------------------------------------------------------------------------------------

    def _fingerprint(self) -> dict:
        return {
            "seed": self.seed, "tokens_per_batch": self.tokens_per_batch, "resolution": self.resolution,
            "video_prob": self.video_prob, "clip_frames": self.clip_frames, "frame_stride": self.frame_stride,
            "clip_fps": self.clip_fps, "shuffle": self.shuffle, "augment": self.augment,
            "num_images": len(self.images) if self.images is not None else 0,
            "num_videos": len(self.videos) if self.videos is not None else 0,
            "patch": [self.patch_size, self.temporal_patch_size, self.merge_size],
        }

    def state_dict(self) -> dict:
        """Where the next round of micro-batches starts (the same on every rank) and what shaped the plan."""
        return {"epoch": self._epoch, "position": self._position, "num_skipped": self.num_skipped,
                "skipped_files": dict(self.skipped_files),
                "unreadable": [[kind, index, reason] for (kind, index), reason in sorted(self._unreadable.items())],
                "fingerprint": self._fingerprint()}

    @property
    def num_skipped_files(self) -> int:
        """Distinct files found unreadable so far (the training engine reports it)."""
        return len(self.skipped_files)

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was taken. Raises ``ValueError`` if the data settings changed."""
        if not isinstance(state, dict) or "epoch" not in state or "position" not in state:
            raise ValueError(f"expected a PretrainData.state_dict() with 'epoch' and 'position', got {state!r}")
        saved = state.get("fingerprint")
        if saved is not None:
            ours = self._fingerprint()
            changed = {k: (saved.get(k), v) for k, v in ours.items() if _plain(saved.get(k)) != _plain(v)}
            if changed:
                detail = ", ".join(f"{k}: saved {a!r} now {b!r}" for k, (a, b) in changed.items())
                raise ValueError(f"cannot resume the data position: the data settings changed ({detail}); resume "
                                 f"with the same sources and settings, or start the data from scratch")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.epoch_size(epoch):
            raise ValueError(f"data position ({epoch}, {position}) is outside epoch {epoch} "
                             f"({self.epoch_size(epoch)} micro-batches)")
        self._epoch, self._position = epoch, position
        self.num_skipped = int(state.get("num_skipped", 0))
        self.skipped_files = dict(state.get("skipped_files", {}))
        self._unreadable = {(int(kind), int(index)): reason for kind, index, reason in state.get("unreadable", [])}

    def __repr__(self) -> str:
        return (f"PretrainData(images={self.images!r}, videos={self.videos!r}, resolution={self.resolution}, "
                f"video_prob={self.video_prob}, tokens_per_batch={self.tokens_per_batch}, "
                f"rank={self.rank}/{self.world_size}, workers={self.num_workers})")


def _plain(value):
    """Tuples and lists compare equal after a round trip through JSON/torch.save."""
    return list(value) if isinstance(value, tuple) else value
