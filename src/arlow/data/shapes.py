"""Synthetic media with known answers, for the end-to-end demonstration: rendered shapes and moving-shape clips.

Every image shows ``count`` (1-4) shapes of one ``colour`` and one ``kind`` on black; a single shape sits in one of
four quadrants (its ``position``). Every clip shows one shape crossing the frame in one ``direction``. Because the
generator knows what it drew, it writes the captions (stage 2), the conversations (stage 3) and held-out questions
with their candidate answers - colour, count, position, direction of motion - for measuring accuracy by scoring
the candidates (:mod:`arlow.finetune.scoring`). Chance is 1/4 on every question type; held-out answers are balanced.

The held-out media come from their own random stream (seeded by ``seed`` alone), so they are the same whatever the
training sizes or ``shuffle_answers`` are. With ``shuffle_answers=True`` every training image and clip is paired
with the texts (captions, answers) of another training sample of its kind: the control in which media and answers
carry no information about each other, so that nothing a model learns can lift it above chance on correctly paired
held-out questions.

Layout written by :func:`write_shapes_dataset`::

    root/images/{train,eval,eval-single,val,val-single}/NNNNN.png   112 x 112 (``image_size``)
    root/clips/{train,eval,val}/NNNNN.mp4  8 frames of 112 x 112 at 4 fps (``clip_size``, ``clip_frames``, ``clip_fps``)
    root/captions.jsonl                    {"image"|"video": path, "caption": ...}            (arlow align)
    root/chat.jsonl                        {"messages": [...]}                               (arlow sft)
    root/eval.jsonl                        {"kind", "media", "task", "question", "choices", "answer"}
                                           (eval_images colour + count, eval_singles position, eval_clips motion)
    root/val.jsonl                         the same for the validation set (``val_images``, ``val_singles``,
                                           ``val_clips``; written only when one of them is set)

The validation questions come from a third random stream, so settings can be chosen on them without ever looking at
the held-out test questions (``eval.jsonl``), and adding them changes neither the training nor the test data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

__all__ = ["COLOURS", "KINDS", "COUNTS", "POSITIONS", "DIRECTIONS", "QUESTIONS", "MEDIA_SETTINGS", "Scene", "Motion",
           "random_scene", "render_scene", "random_motion", "render_clip", "write_shapes_dataset", "eval_items"]

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40)}
KINDS = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three", "four")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
DIRECTIONS = ("left", "right", "up", "down")
QUESTIONS = {
    "colour": "What colour are the shapes?",
    "count": "How many shapes are there?",
    "position": "Where is the shape?",
    "motion": "Which way does the shape move?",
}
CHOICES = {"colour": tuple(COLOURS), "count": COUNTS, "position": POSITIONS, "motion": DIRECTIONS}
# Processor settings that keep the generated sizes as they are (112 px: 16 tokens per image and per temporal patch
# of a clip) and sample the clips' 8 frames.
MEDIA_SETTINGS = {"min_pixels": 56 * 56, "max_pixels": 112 * 112, "fps": 4.0, "max_frames": 8}


@dataclass
class Scene:
    colour: str
    kind: str
    count: int
    centres: list[tuple[float, float]]  # (x, y) pixels
    radius: float
    position: str | None  # quadrant of a single shape

    def caption(self) -> str:
        if self.count == 1:
            return f"a {self.colour} {self.kind} in the {self.position}."
        return f"{COUNTS[self.count - 1]} {self.colour} {self.kind}s."


@dataclass
class Motion:
    colour: str
    kind: str
    direction: str
    radius: float
    start: tuple[float, float]
    end: tuple[float, float]

    def caption(self) -> str:
        return f"a {self.colour} {self.kind} moving {self.direction}."


def _draw(draw: ImageDraw.ImageDraw, kind: str, centre: tuple[float, float], radius: float, fill) -> None:
    x, y = centre
    if kind == "circle":
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill)
    elif kind == "square":
        r = radius * 0.9
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    else:
        draw.polygon([(x, y - radius), (x - radius, y + radius * 0.8), (x + radius, y + radius * 0.8)], fill=fill)


def random_scene(rng: np.random.Generator, size: int = 112, count: int | None = None, colour: str | None = None,
                 position: str | None = None) -> Scene:
    """A scene with the given (or random) count, colour and, for one shape, quadrant. Each shape sits inside its own
    quadrant, so shapes never overlap."""
    count = int(count if count is not None else rng.integers(1, 5))
    colour = colour if colour is not None else list(COLOURS)[rng.integers(len(COLOURS))]
    kind = KINDS[rng.integers(len(KINDS))]
    # A shape must cover more than a 28 px merge window: smaller ones (partly covered windows) leave a signal too
    # weak for a tiny model to pick up in minutes (measured: 15-30 px squares stay at chance, 30-60 px learn).
    radius = size / 6.0
    margin = radius + 1
    half = size / 2

    def in_quadrant(quadrant: str) -> tuple[float, float]:
        left, top = quadrant.endswith("left"), quadrant.startswith("top")
        x = rng.uniform(margin, half - radius) if left else rng.uniform(half + radius, size - margin)
        y = rng.uniform(margin, half - radius) if top else rng.uniform(half + radius, size - margin)
        return float(x), float(y)

    if count == 1:
        position = position if position is not None else POSITIONS[rng.integers(len(POSITIONS))]
        return Scene(colour, kind, 1, [in_quadrant(position)], radius, position)
    # several shapes: one per quadrant, in distinct random quadrants (they never overlap)
    quadrants = [POSITIONS[i] for i in rng.choice(len(POSITIONS), count, replace=False)]
    return Scene(colour, kind, count, [in_quadrant(q) for q in quadrants], radius, None)


def render_scene(scene: Scene, size: int = 112) -> Image.Image:
    image = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for centre in scene.centres:
        _draw(draw, scene.kind, centre, scene.radius, COLOURS[scene.colour])
    return image


def random_motion(rng: np.random.Generator, size: int = 112, direction: str | None = None,
                  colour: str | None = None) -> Motion:
    direction = direction if direction is not None else DIRECTIONS[rng.integers(len(DIRECTIONS))]
    colour = colour if colour is not None else list(COLOURS)[rng.integers(len(COLOURS))]
    kind = KINDS[rng.integers(len(KINDS))]
    radius = size / 5.0  # a 45 px shape crossing most of the frame: it passes through 3 of the 4 token columns
    lo, hi = radius + 1, size - radius - 1
    across = rng.uniform(lo, hi)
    a, b = (lo, hi) if direction in ("right", "down") else (hi, lo)
    if direction in ("left", "right"):
        return Motion(colour, kind, direction, radius, (a, across), (b, across))
    return Motion(colour, kind, direction, radius, (across, a), (across, b))


def render_clip(motion: Motion, frames: int = 8, size: int = 112) -> np.ndarray:
    """uint8 ``(frames, size, size, 3)``: the shape moves linearly from ``start`` to ``end``."""
    out = []
    for i in range(frames):
        f = i / max(frames - 1, 1)
        centre = (motion.start[0] + f * (motion.end[0] - motion.start[0]),
                  motion.start[1] + f * (motion.end[1] - motion.start[1]))
        image = Image.new("RGB", (size, size), (0, 0, 0))
        _draw(ImageDraw.Draw(image), motion.kind, centre, motion.radius, COLOURS[motion.colour])
        out.append(np.asarray(image))
    return np.stack(out)


def _write_clip(path: Path, frames: np.ndarray, fps: float) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"qscale": "2"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _user(media_kind: str, path: str, text: str) -> dict:
    return {"role": "user", "content": [{"type": media_kind, "path": path}, {"type": "text", "text": text}]}


def _turns(tasks: list[tuple[str, str]], rng: np.random.Generator, media_kind: str, path: str) -> list[dict]:
    """A conversation asking ``tasks`` ((task, answer) pairs) in random order; the media opens the first turn."""
    order = rng.permutation(len(tasks))
    messages = []
    for n, i in enumerate(order):
        task, answer = tasks[i]
        if n == 0:
            messages.append(_user(media_kind, path, QUESTIONS[task]))
        else:
            messages.append({"role": "user", "content": QUESTIONS[task]})
        messages.append({"role": "assistant", "content": answer})
    return messages


_TEXT_ONLY = [
    ("Name a colour.", "red"), ("What comes after one?", "two"), ("What is the opposite of left?", "right"),
    ("What is the opposite of up?", "down"), ("How many sides does a triangle have?", "three"),
    ("How many corners does a square have?", "four"), ("What is the opposite of top?", "bottom"),
]


def _balanced(rng: np.random.Generator, n: int, options) -> list:
    """``n`` values cycling through ``options`` in a random order: every answer equally often (chance = 1/k)."""
    values = [options[i % len(options)] for i in range(n)]
    return [values[i] for i in rng.permutation(n)]


def _derangement(rng: np.random.Generator, n: int) -> list[int]:
    """A random permutation of ``range(n)`` moving every index (``n >= 2``): sample ``i`` takes ``j != i``'s texts."""
    shift = rng.permutation(n)
    # a random cycle through all n indices: each one points at the next, so none stays in place
    out = [0] * n
    for a, b in zip(shift, np.roll(shift, -1)):
        out[int(a)] = int(b)
    return out


def write_shapes_dataset(root: str | Path, *, train_images: int = 400, train_clips: int = 200, eval_images: int = 100,
                         eval_singles: int = 100, eval_clips: int = 100, val_images: int = 0, val_singles: int = 0,
                         val_clips: int = 0, image_size: int = 112,
                         clip_size: int = 112, clip_frames: int = 8, clip_fps: float = 4.0,
                         text_only_fraction: float = 0.05, pair_fraction: float = 0.1, single_fraction: float = 0.5,
                         seed: int = 0, shuffle_answers: bool = False) -> dict[str, Path]:
    """Write the demonstration data set (see the module docstring); returns the paths of its parts.

    ``pair_fraction`` of the training conversations show two images at once (questions about the first or the
    second), ``text_only_fraction`` have no media at all: the chat data exercises multi-image and text-only
    conversations as well as multi-turn ones. ``single_fraction`` of the training images show one shape (the others
    2-4 in equal parts). Held out: ``eval_images`` images with every count and colour equally often (one colour and
    one count question each), ``eval_singles`` single-shape images with every quadrant equally often (a position
    question each) and ``eval_clips`` clips with every direction equally often (a motion question each).
    Deterministic in ``seed``; the held-out part depends on ``seed`` and the eval sizes only. ``val_*``: a validation
    set built like the held-out one from its own stream (``val.jsonl``), for choosing settings.
    """
    if shuffle_answers and (train_images < 2 or train_clips < 2):
        raise ValueError("shuffle_answers needs at least 2 training images and 2 training clips to shuffle between")
    root = Path(root)
    rng = np.random.default_rng(seed)
    held_out_rng = np.random.default_rng([seed, 1])  # its own stream: the same held-out set for every variant
    val_rng = np.random.default_rng([seed, 2])  # the validation set's own stream
    validation = bool(val_images or val_singles or val_clips)
    for sub in ("images/train", "images/eval", "images/eval-single", "clips/train", "clips/eval"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    if validation:
        for sub in ("images/val", "images/val-single", "clips/val"):
            (root / sub).mkdir(parents=True, exist_ok=True)
    captions, chats = [], []

    def image_set(rng: np.random.Generator, folder: str, counts: list[int]) -> list[tuple[str, Scene]]:
        n = len(counts)
        colours = _balanced(rng, n, list(COLOURS))
        singles = [i for i in range(n) if counts[i] == 1]
        positions = dict(zip(singles, _balanced(rng, len(singles), list(POSITIONS))))
        out = []
        for i in range(n):
            scene = random_scene(rng, image_size, counts[i], colours[i], positions.get(i))
            path = root / "images" / folder / f"{i:05d}.png"
            render_scene(scene, image_size).save(path)
            out.append((str(path.relative_to(root)), scene))
        return out

    def clip_set(rng: np.random.Generator, folder: str, n: int) -> list[tuple[str, Motion]]:
        directions = _balanced(rng, n, list(DIRECTIONS))
        colours = _balanced(rng, n, list(COLOURS))
        out = []
        for i in range(n):
            motion = random_motion(rng, clip_size, directions[i], colours[i])
            path = root / "clips" / folder / f"{i:05d}.mp4"
            _write_clip(path, render_clip(motion, clip_frames, clip_size), clip_fps)
            out.append((str(path.relative_to(root)), motion))
        return out

    def scene_tasks(scene: Scene) -> list[tuple[str, str]]:
        tasks = [("colour", scene.colour), ("count", COUNTS[scene.count - 1])]
        if scene.position is not None:
            tasks.append(("position", scene.position))
        return tasks

    # more single shapes than 1 in 4: only they carry position questions
    n_single = int(round(single_fraction * train_images))
    counts = [1] * n_single + _balanced(rng, train_images - n_single, [2, 3, 4])
    train_scenes = image_set(rng, "train", [counts[i] for i in rng.permutation(train_images)])
    train_motions = clip_set(rng, "train", train_clips)
    if shuffle_answers:  # media of one sample, texts of another
        scenes, motions = [s for _, s in train_scenes], [m for _, m in train_motions]
        train_scenes = [(path, scenes[j]) for (path, _), j in zip(train_scenes, _derangement(rng, len(scenes)))]
        train_motions = [(path, motions[j]) for (path, _), j in zip(train_motions, _derangement(rng, len(motions)))]
    for path, scene in train_scenes:
        captions.append({"image": path, "caption": scene.caption()})
        tasks = scene_tasks(scene)
        # one single-turn conversation per question (the evaluation's format) and one multi-turn conversation
        for task in tasks:
            chats.append({"messages": _turns([task], rng, "image", path)})
        chats.append({"messages": _turns(tasks, rng, "image", path)})
    for path, motion in train_motions:
        captions.append({"video": path, "caption": motion.caption()})
        # motion alone and with colour (colour is learnt from images anyway; motion questions are the clips' job)
        chats.append({"messages": _turns([("motion", motion.direction)], rng, "video", path)})
        chats.append({"messages": _turns([("motion", motion.direction), ("colour", motion.colour)], rng, "video",
                                         path)})
    n_pairs = int(pair_fraction * len(chats))
    for _ in range(n_pairs):
        a, b = rng.choice(len(train_scenes), 2, replace=False)
        which = int(rng.integers(2))
        scene = train_scenes[(a, b)[which]][1]
        question = f"How many shapes are in the {('first', 'second')[which]} image?"
        chats.append({"messages": [
            {"role": "user", "content": [{"type": "image", "path": train_scenes[a][0]},
                                         {"type": "image", "path": train_scenes[b][0]},
                                         {"type": "text", "text": question}]},
            {"role": "assistant", "content": COUNTS[scene.count - 1]},
        ]})
    for _ in range(int(text_only_fraction * len(chats))):
        question, answer = _TEXT_ONLY[rng.integers(len(_TEXT_ONLY))]
        chats.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    order = rng.permutation(len(chats))

    def question_set(rng: np.random.Generator, folder: str, images: int, singles: int, clips: int) -> list[dict]:
        """Questions with balanced answers on fresh media: colour + count, position (single shapes), motion."""
        out = []

        def ask(kind: str, path: str, task: str, answer: str) -> None:
            out.append({"kind": kind, "media": path, "task": task, "question": QUESTIONS[task],
                        "choices": list(CHOICES[task]), "answer": answer})

        for path, scene in image_set(rng, folder, _balanced(rng, images, [1, 2, 3, 4])):
            ask("image", path, "colour", scene.colour)
            ask("image", path, "count", COUNTS[scene.count - 1])
        for path, scene in image_set(rng, f"{folder}-single", [1] * singles):
            ask("image", path, "position", scene.position)
        for path, motion in clip_set(rng, folder, clips):
            ask("video", path, "motion", motion.direction)
        return out

    evals = question_set(held_out_rng, "eval", eval_images, eval_singles, eval_clips)
    vals = question_set(val_rng, "val", val_images, val_singles, val_clips) if validation else []

    paths = {"root": root, "captions": root / "captions.jsonl", "chat": root / "chat.jsonl",
             "eval": root / "eval.jsonl", "train_images": root / "images" / "train",
             "train_clips": root / "clips" / "train"}
    if validation:
        paths["val"] = root / "val.jsonl"
    for name, rows in (("captions", captions), ("chat", [chats[i] for i in order]), ("eval", evals),
                       *((("val", vals),) if validation else ())):
        with open(paths[name], "w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    (root / "shapes.json").write_text(json.dumps({
        "seed": seed, "shuffle_answers": shuffle_answers, "train_images": train_images, "train_clips": train_clips,
        "eval_images": eval_images, "eval_singles": eval_singles, "eval_clips": eval_clips, "val_images": val_images,
        "val_singles": val_singles, "val_clips": val_clips, "image_size": image_size, "clip_size": clip_size, "clip_frames": clip_frames, "clip_fps": clip_fps, "captions": len(captions),
        "conversations": len(chats), "eval_questions": len(evals)}, indent=2) + "\n")
    return paths


def eval_items(path: str | Path) -> list[dict]:
    """The held-out questions of ``eval.jsonl`` with media paths made absolute."""
    path = Path(path)
    items = []
    for line in path.read_text().splitlines():
        if line.strip():
            item = json.loads(line)
            item["media"] = str(path.parent / item["media"])
            items.append(item)
    return items
