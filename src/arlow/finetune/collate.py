"""Examples -> one micro-batch: right padding, packed media, and the dummy vision row.

The dummy vision row exists for distributed training (peers-and-anchors B.16). A micro-batch without any image or
video would leave the vision tower, the mergers and the DeepStack gates out of the forward on that rank while other
ranks use them: DDP then waits for gradients that never come (or fails with "expected to have finished reduction"),
and ZeRO-3 / FSDP hang in the parameter all-gathers the other ranks enter. So such a micro-batch gets one extra row
holding a 1-token image of zeros (``<|vision_start|><image><|vision_end|>``, a ``1 x s x s`` patch grid) whose labels
are all ignored. Every parameter then takes part in every forward, and the loss - the mean over target tokens - is
exactly the loss of the real rows (the dummy row has no targets); its gradient contribution is zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .examples import IGNORE_INDEX, MEDIA_KEYS, Example

__all__ = ["DummyVision", "collate_examples"]


@dataclass(frozen=True)
class DummyVision:
    """What the dummy row needs to know about the processor / vision encoder."""

    image_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    patch_dim: int  # C * Tp * P * P
    merge_size: int

    @classmethod
    def from_processor(cls, processor) -> "DummyVision":
        ip = processor.image_processor
        return cls(processor.image_token_id, processor.vision_start_token_id, processor.vision_end_token_id,
                   3 * ip.temporal_patch_size * ip.patch_size**2, ip.merge_size)

    def example(self) -> Example:
        ids = torch.tensor([self.vision_start_token_id, self.image_token_id, self.vision_end_token_id])
        grid = torch.tensor([[1, self.merge_size, self.merge_size]])
        pixels = torch.zeros(self.merge_size**2, self.patch_dim)
        return Example(ids, torch.full_like(ids, IGNORE_INDEX), {"pixel_values": pixels, "image_grid_thw": grid})


def collate_examples(examples: list[Example], pad_token_id: int, dummy: DummyVision | None = None) -> dict:
    """Right-pad ``examples`` into one micro-batch.

    Returns ``input_ids (B, L)``, ``attention_mask (B, L)``, ``labels (B, L)`` (``-100`` on padding), the media
    tensors concatenated in example order (so runs and grid rows stay matched), and the counts ``num_tokens`` (real
    tokens) and ``num_samples`` that the engine logs. With ``dummy`` and no media in any example, one dummy row is
    appended (see the module docstring); it is not counted.
    """
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    rows = list(examples)
    has_media = any(ex.media.get("pixel_values") is not None or ex.media.get("pixel_values_videos") is not None
                    for ex in rows)
    if dummy is not None and not has_media:
        rows.append(dummy.example())
    length = max(len(ex) for ex in rows)
    batch = len(rows)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    for i, ex in enumerate(rows):
        n = len(ex)
        input_ids[i, :n] = ex.input_ids
        labels[i, :n] = ex.labels
        attention_mask[i, :n] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    for key in MEDIA_KEYS:
        parts = [ex.media[key] for ex in rows if ex.media.get(key) is not None]
        if parts:
            out[key] = torch.cat(parts)
    out["num_tokens"] = int(sum(len(ex) for ex in examples))
    out["num_samples"] = len(examples)
    return out
