"""Atomic checkpoints and resume discovery (design D9).

Layout of ``output_dir``::

    checkpoint-200/                 complete checkpoints only (a rename is what makes one appear)
        model.safetensors           full model weights (always; under DeepSpeed/FSDP gathered from the shards)
        optimizer.bin, scaler.pt    accelerate ``save_state`` files (DeepSpeed: pytorch_model/ with ZeRO shards)
        random_states_{rank}.pkl    python / numpy / torch (/cuda) RNG states of every process
        scheduler.pt                lr schedule state
        data_state_{rank}.pt        each process's data position (``data.state_dict()``)
        config.json                 the model's config, when it is a transformers PreTrainedModel (with
                                    model.safetensors a folder that loads with from_pretrained)
        ...                         whatever the on_checkpoint hook writes (pretraining: the export)
        trainer_state.json          step, counters, config; written last
    .tmp-checkpoint-200/            a checkpoint being written (or left by a crash): never picked by resume

A checkpoint is written into the hidden temporary sibling and renamed into place once every process has
finished writing and the hook has run, so a crash at any moment leaves either the complete checkpoint or none.
Files are read back with :func:`safe_load` (``weights_only``): a checkpoint cannot run code on resume.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from accelerate.utils import load

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-" + PREFIX
TRASH_PREFIX = ".trash-" + PREFIX
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{PREFIX}{step}"


def is_complete(path: str | Path) -> bool:
    """A directory named ``checkpoint-{step}`` that holds ``trainer_state.json``."""
    path = Path(path)
    return bool(_NAME.match(path.name)) and (path / STATE_FILE).is_file()


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir`` as (step, path), oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """Map ``TrainConfig.resume`` to a checkpoint directory.

    None -> None (fresh run); "latest" -> newest complete checkpoint in ``output_dir``, or None when there is none
    yet (so a preempted job can always be restarted with the same command); a path -> that checkpoint, which must
    be complete.
    """
    if resume is None:
        return None
    if resume == "latest":
        return find_latest_checkpoint(output_dir)
    path = Path(resume)
    if not path.is_dir():
        raise ValueError(f"--resume {resume} does not exist or is not a directory; give a checkpoint-N directory "
                         f"or latest")
    if not is_complete(path):
        raise ValueError(
            f"--resume {resume} is not a complete checkpoint (a directory named checkpoint-N holding {STATE_FILE}); "
            f"complete checkpoints in {output_dir}: {[str(p) for _, p in list_checkpoints(output_dir)]}"
        )
    return path


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text())


def write_trainer_state(directory: str | Path, state: dict[str, Any]) -> None:
    (Path(directory) / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))


def remove_stale_temporaries(output_dir: str | Path) -> None:
    """Delete half-written checkpoints left by a crash (call on the main process before training)."""
    output_dir = Path(output_dir)
    if output_dir.is_dir():
        for child in output_dir.iterdir():
            if child.name.startswith((TMP_PREFIX, TRASH_PREFIX)) and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)


def save_atomically(
    output_dir: str | Path,
    step: int,
    write: Callable[[Path], None],
    *,
    is_main: bool,
    barrier: Callable[[], None],
    finalize: Callable[[Path], None],
) -> Path:
    """Write checkpoint ``step``: every process runs ``write(tmp_dir)``; after a barrier the main process runs
    ``finalize(tmp_dir)`` (which must write ``trainer_state.json``) and renames ``tmp_dir`` to ``checkpoint-{step}``.

    An existing ``checkpoint-{step}`` is replaced (moved aside first, deleted after the rename). Returns the final path.
    """
    output_dir = Path(output_dir)
    tmp = output_dir / f"{TMP_PREFIX}{step}"
    final = checkpoint_path(output_dir, step)
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    write(tmp)
    barrier()
    if is_main:
        finalize(tmp)
        if not (tmp / STATE_FILE).is_file():
            raise RuntimeError(f"checkpoint finalize step did not write {STATE_FILE} into {tmp}")
        _fsync_tree(tmp)
        trash = None
        if final.exists():
            trash = output_dir / f"{TRASH_PREFIX}{step}"
            if trash.exists():
                shutil.rmtree(trash)
            os.replace(final, trash)
        os.replace(tmp, final)
        _fsync_dir(output_dir)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    barrier()
    return final


def prune_checkpoints(output_dir: str | Path, keep_last: int | None) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (None or 0: keep all). Returns the deleted paths."""
    if not keep_last:
        return []
    found = list_checkpoints(output_dir)
    doomed = [path for _, path in found[:-keep_last]]
    for path in doomed:
        # Rename first so that a crash mid-delete cannot leave a checkpoint-N that looks complete but is not.
        trash = path.parent / (TRASH_PREFIX + path.name[len(PREFIX):])
        if trash.exists():  # left by a crash mid-delete: os.replace cannot replace a non-empty directory
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def share_modes(root: str | Path) -> None:
    """Give ``root`` and everything under it the usual modes of a published folder: 0o755 directories, 0o644
    files. ``tempfile.mkdtemp`` makes folders private (0o700) and transformers writes weights 0o600."""
    root = Path(root)
    root.chmod(0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)


def publish_folder(final: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` fills a temporary sibling of ``final``, which then gets :func:`share_modes` and replaces
    ``final``: an interrupted or failed write never leaves a half-written folder (nor a temporary one) behind."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        write(tmp)
        share_modes(tmp)  # mkdtemp and save_pretrained make it private; a published folder is meant to be shared
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _fsync_tree(root: Path) -> None:
    # The rename must not reach the disk before the files it publishes (power loss, not just a process crash).
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def safe_load(path: str | Path) -> Any:
    """``torch.load`` of a checkpoint file that holds only tensors and plain data (dicts, lists, numbers, strings,
    numpy RNG states): loading never runs code from the file. A file holding anything else is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the checkpoint is incomplete; resume from another one")
    with refusing_code(path):
        return load(path, map_location="cpu", weights_only=True)


@contextmanager
def refusing_code(what: str | Path) -> Iterator[None]:
    """Turn torch's ``weights_only`` refusal (an ``UnpicklingError``) into one clear ``ValueError`` about ``what``."""
    try:
        yield
    except pickle.UnpicklingError as err:
        named = re.search(r"GLOBAL ([\w.]+)", str(err))
        detail = f" (it calls {named.group(1)})" if named else ""
        raise ValueError(
            f"refusing to load {what}: it holds objects other than tensors and plain data, and unpickling them could "
            f"run code{detail}. Arlow never writes such files; resume only from checkpoints you trust."
        ) from None
