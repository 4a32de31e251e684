"""Records -> token ids, labels and media tensors: the loss masks and the truncation rule live here.

Two encodings, one per stage:

* **caption** (stage 2, ``arlow align``): ``<|vision_start|><image>...<|vision_end|>`` + ``caption_prompt`` +
  ``caption`` + ``<|endoftext|>``, the LLaVA "plain" format. Labels are the caption tokens and the closing
  ``<|endoftext|>``; the media run and the prompt are inputs only.
* **chat** (stage 3, ``arlow sft``): the processor's chat template. Labels are the assistant turns, each with its
  closing ``<|im_end|>`` (the template's ``{% generation %}`` blocks, via ``return_assistant_tokens_mask``); system
  and user turns, the ``<|im_start|>assistant\\n`` headers and the media runs are inputs only.

Truncation (:func:`truncate`) may only remove text at the end: if the cut would remove any vision token (a run of
``<image>``/``<video>`` placeholders or their ``<|vision_start|>``/``<|vision_end|>``), the example is rejected with
:class:`RejectedExample` (the data pipeline drops and counts it, or stops, as configured) - the processor output and
the placeholders must never disagree (peers-and-anchors B.10). An example left without any target token is rejected
too (its loss would be 0/0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "IGNORE_INDEX",
    "MEDIA_KEYS",
    "Example",
    "RejectedExample",
    "ExampleEncoder",
    "caption_parts",
    "to_messages",
    "truncate",
]

IGNORE_INDEX = -100
# Processor outputs that describe media; concatenated along dim 0 when examples are batched.
MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_PLACEHOLDER = re.compile(r"<image>|<video>")


class RejectedExample(ValueError):
    """An example that cannot be trained on. ``kind`` is ``"overflow"`` (too long to truncate safely),
    ``"no_target"`` (no token to learn) or ``"unreadable"`` (bad record or media)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class Example:
    """One encoded example.

    Args:
        input_ids: ``(L,)`` token ids with every placeholder run expanded.
        labels: ``(L,)`` target ids, ``-100`` where no loss is taken (unshifted, as the model expects).
        media: processor outputs for this example's media (``pixel_values (N, C*Tp*P*P)``, ``image_grid_thw (n, 3)``,
            ``pixel_values_videos``, ``video_grid_thw``, ``second_per_grid_ts``); absent keys = no such media.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    media: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_targets(self) -> int:
        """Tokens that contribute to the loss (a label at position 0 has no preceding token to predict it)."""
        return int((self.labels[1:] != IGNORE_INDEX).sum())


# ----------------------------------------------------------------------------------------------------------------
# Records -> caption parts / chat messages


def caption_parts(record: dict) -> tuple[str, Any, str]:
    """``(kind, media, caption)`` of a caption record ``{"image"|"video": media, "caption": str}``."""
    if not isinstance(record.get("caption"), str) or not record["caption"].strip():
        raise RejectedExample("unreadable", f"a caption record needs a non-empty 'caption' string; got keys "
                                            f"{sorted(record)}")
    present = [k for k in ("image", "video") if record.get(k) is not None]
    if len(present) != 1:
        raise RejectedExample("unreadable", "a caption record needs exactly one of 'image' or 'video' (a path, URL "
                                            f"or bytes); got {present or 'neither'}")
    return present[0], record[present[0]], record["caption"].strip()


def _llava_messages(record: dict) -> list[dict]:
    """LLaVA's ``{"conversations": [{"from", "value"}], "image": ...}`` -> chat messages with media blocks."""
    media = {}
    for kind in ("image", "video"):
        values = record.get(kind, record.get(kind + "s"))
        media[kind] = list(values) if isinstance(values, (list, tuple)) else ([] if values is None else [values])
    queues = {kind: list(values) for kind, values in media.items()}
    messages = []
    for turn in record["conversations"]:
        role = _ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        if role is None:
            raise RejectedExample("unreadable", f"unknown speaker {turn.get('from')!r} (expected human/gpt/system)")
        text = str(turn.get("value", turn.get("content", "")))
        blocks, last = [], 0
        for match in _PLACEHOLDER.finditer(text):
            kind = match.group()[1:-1]
            if not queues[kind]:
                raise RejectedExample("unreadable", f"the conversation has more <{kind}> placeholders than the "
                                                    f"{len(media[kind])} {kind}(s) of the record")
            piece = text[last:match.start()].strip("\n")
            if piece:
                blocks.append({"type": "text", "text": piece})
            blocks.append({"type": kind, kind: queues[kind].pop(0)})
            last = match.end()
        piece = text[last:].strip("\n") if blocks else text[last:]
        if piece:
            blocks.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": blocks})
    # LLaVA puts the image of a record without placeholder before the first human turn
    for kind, rest in queues.items():
        if rest and rest == media[kind]:
            first_user = next(m for m in messages if m["role"] == "user")
            first_user["content"] = [{"type": kind, kind: item} for item in rest] + first_user["content"]
        elif rest:
            raise RejectedExample("unreadable", f"{len(rest)} {kind}(s) of the record have no <{kind}> placeholder")
    return messages


def to_messages(record: dict) -> list[dict]:
    """Chat messages of a conversation record (native ``messages`` or LLaVA ``conversations``), validated."""
    if isinstance(record.get("messages"), list):
        messages = [dict(m) for m in record["messages"]]
    elif isinstance(record.get("conversations"), list):
        messages = _llava_messages(record)
    else:
        raise RejectedExample("unreadable", "a conversation record needs 'messages' (chat format) or 'conversations' "
                                            f"(LLaVA format); got keys {sorted(record)}")
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise RejectedExample("unreadable", f"message {i} has role {role!r}; expected system, user or assistant")
        content = message.get("content")
        if not isinstance(content, (str, list)):
            raise RejectedExample("unreadable", f"message {i} content must be a string or a list of blocks")
    if not any(m["role"] == "assistant" for m in messages):
        raise RejectedExample("no_target", "the conversation has no assistant turn, so nothing to learn")
    return messages


# ----------------------------------------------------------------------------------------------------------------
# Truncation


def truncate(example: Example, max_length: int | None, protected_ids: list[int]) -> Example:
    """Cut ``example`` to ``max_length`` tokens, from the end, if that removes text only.

    Raises :class:`RejectedExample` (``"overflow"``) when a vision token (``protected_ids``) lies at or beyond
    ``max_length`` (the cut would split or drop a placeholder run), and (``"no_target"``) when no target is left.
    """
    ids, labels = example.input_ids, example.labels
    if max_length is not None and len(ids) > max_length:
        protected = torch.isin(ids, torch.tensor(protected_ids, dtype=ids.dtype)).nonzero().flatten()
        if protected.numel() and int(protected.max()) >= max_length:
            raise RejectedExample(
                "overflow",
                f"{len(ids)} tokens exceed max_length={max_length} and the vision tokens reach position "
                f"{int(protected.max())}: truncating would cut a placeholder run. Raise max_length, or lower "
                "max_pixels / the number of frames, or shorten the text",
            )
        example = Example(ids[:max_length], labels[:max_length], example.media)
    if example.num_targets == 0:
        raise RejectedExample("no_target", "no target tokens left (nothing to learn: empty answer, or the answer was "
                                           f"cut by max_length={max_length})")
    return example


# ----------------------------------------------------------------------------------------------------------------
# The encoder


class ExampleEncoder:
    """``record -> Example`` for one stage. Picklable, so DataLoader workers can run it.

    Args:
        processor: an :class:`~arlow.processing.ArlowProcessor`.
        task: ``"caption"`` (stage 2) or ``"chat"`` (stage 3); see the module docstring.
        max_length: longest example in tokens (``None``: no limit); see :func:`truncate`.
        caption_prompt: text between the media and the caption (``"caption"`` only; not a target).
        media_kwargs: processing options for every example (``max_pixels``, ``min_pixels``, ``fps``, ``num_frames``,
            ``max_frames`` ...).
    """

    def __init__(self, processor, task: str, max_length: int | None = 2048, caption_prompt: str = "",
                 media_kwargs: dict | None = None):
        if task not in ("caption", "chat"):
            raise ValueError(f"task must be 'caption' (alignment) or 'chat' (instruction tuning), got {task!r}")
        if max_length is not None and max_length < 8:
            raise ValueError(f"max_length must be >= 8 tokens or None, got {max_length}")
        if caption_prompt and task != "caption":
            raise ValueError("caption_prompt applies to caption data (arlow align) only")
        self.processor = processor
        self.task = task
        self.max_length = max_length
        self.caption_prompt = caption_prompt
        self.media_kwargs = dict(media_kwargs or {})
        self.protected_ids = [processor.image_token_id, processor.video_token_id, processor.vision_start_token_id,
                              processor.vision_end_token_id]
        tokenizer = processor.tokenizer
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; captions need one to end on")
        self.eos_id = tokenizer.eos_token_id

    def __call__(self, record: dict) -> Example:
        example = self.encode_caption(record) if self.task == "caption" else self.encode_chat(record)
        return truncate(example, self.max_length, self.protected_ids)

    def _media_error(self, err: Exception) -> RejectedExample:
        return RejectedExample("unreadable", f"{type(err).__name__}: {err}")

    def encode_caption(self, record: dict) -> Example:
        """Caption record -> ``[media run][prompt][caption]<eos>`` with labels on ``caption<eos>``."""
        kind, media, caption = caption_parts(record)
        prefix = f"<{kind}>" + self.caption_prompt
        try:
            out = self.processor(text=[prefix], **{f"{kind}s": [media]}, return_tensors="pt", **self.media_kwargs)
        except (ValueError, OSError, RuntimeError) as err:
            raise self._media_error(err) from err
        prefix_ids = out["input_ids"][0]
        # The caption is tokenized on its own so that no BPE merge crosses the prompt/caption border.
        caption_ids = self.processor.tokenizer(caption, add_special_tokens=False)["input_ids"]
        target = torch.tensor(list(caption_ids) + [self.eos_id], dtype=torch.long)
        ids = torch.cat([prefix_ids.long(), target])
        labels = torch.cat([torch.full_like(prefix_ids, IGNORE_INDEX).long(), target])
        return Example(ids, labels, {k: out[k] for k in MEDIA_KEYS if k in out})

    def encode_chat(self, record: dict) -> Example:
        """Conversation record -> the chat template's ids, labels on the assistant turns."""
        messages = to_messages(record)
        try:
            out = self.processor.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt",
                **self.media_kwargs,
            )
        except (ValueError, OSError, RuntimeError, KeyError, TypeError) as err:
            raise self._media_error(err) from err
        ids = out["input_ids"][0].long()
        mask = torch.as_tensor(out["assistant_masks"])[0].bool()
        labels = ids.masked_fill(~mask, IGNORE_INDEX)
        return Example(ids, labels, {k: out[k] for k in MEDIA_KEYS if k in out})
