"""MAE reconstruction grids: original / masked / reconstruction / reconstruction with visible patches pasted.

With ``norm_pix_loss`` the decoder predicts each patch normalised by that patch's own mean and std. Putting the
true statistics of a *masked* patch back would leak what the model never saw (peers-and-anchors B.5), so a masked
patch is de-normalised with the mean/std of the visible patches of the nearest visible windows (same item, same
temporal slice first, by grid distance); predictions for visible patches use their own, seen statistics. The
"reconstruction" panel is the decoder's output everywhere; "pasted" replaces the visible windows by the input.
Every panel is leak-free.

``arlow reconstruct --checkpoint DIR --inputs a.jpg b.mp4 --output grid.png`` runs it from the command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..data.augment import image_normalisation
from ..processing.patches import unpatchify
from .data import PretrainData
from .export import load_mae_checkpoint
from .mae import ArlowMAEForPreTraining, normalize_patches
from .masking import window_positions

__all__ = ["reconstruct_items", "reconstruction_grid", "save_reconstruction_grid", "side_by_side", "run"]


def _denormalize_from_visible(pred: torch.Tensor, rows: torch.Tensor, masked: torch.Tensor, positions: torch.Tensor,
                              neighbours: int = 4) -> torch.Tensor:
    """Map per-patch-normalised predictions of one item back to pixel space without using masked statistics.

    Visible windows use their own (seen) statistics; masked windows borrow those of the nearest visible windows.
    pred, rows: ``(M, s2, D)``; masked: ``(M,)``; positions: ``(M, 3)`` window coordinates.
    """
    _, mean, std = normalize_patches(rows.float())  # (M, s2, 1) each
    out = pred.float() * std + mean
    visible = torch.nonzero(~masked).view(-1)
    if visible.numel() == 0:
        return out
    vis_mean = mean[visible].mean(dim=1)  # (V, 1): one statistic per visible window
    vis_std = std[visible].mean(dim=1)
    for w in torch.nonzero(masked).view(-1).tolist():
        # temporal distance dominates, then spatial: prefer neighbours in the same slice
        d = ((positions[visible] - positions[w]).float() * torch.tensor([100.0, 1.0, 1.0])).norm(dim=-1)
        nearest = torch.argsort(d)[:neighbours]
        out[w] = pred[w].float() * vis_std[nearest].mean() + vis_mean[nearest].mean()
    return out


@torch.no_grad()
def reconstruct_items(model: ArlowMAEForPreTraining, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                      seed: int = 0, mask_ratio: float | None = None) -> list[dict[str, torch.Tensor]]:
    """Run the MAE on a packed batch and return, per item, frames ``(T, C, H, W)`` in normalised pixel space:
    ``original``, ``masked`` (hidden windows zeroed = mid-grey), ``reconstruction``, ``pasted``."""
    vc = model.config.vision_config
    s2 = vc.spatial_merge_size**2
    generator = torch.Generator().manual_seed(seed)
    noise_len = int(((grid_thw[:, 1] // vc.spatial_merge_size) * (grid_thw[:, 2] // vc.spatial_merge_size)).sum())
    noise = torch.rand(noise_len, generator=generator)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = model(pixel_values.to(device), grid_thw.to(device), noise=noise.to(device), mask_ratio=mask_ratio)
    model.train(was_training)
    pred, masked = out.pred.float().cpu(), out.mask.cpu()
    rows = pixel_values.float().cpu().view(-1, s2, vc.patch_dim)
    positions = window_positions(grid_thw.cpu(), vc.spatial_merge_size)
    results, start = [], 0
    for grid, count in zip(grid_thw.cpu(), out.window_counts.tolist()):
        sl = slice(start, start + count)
        start += count
        item_rows, item_masked = rows[sl], masked[sl]
        if model.config.norm_pix_loss:
            recon = _denormalize_from_visible(pred[sl], item_rows, item_masked, positions[sl])
        else:
            recon = pred[sl].clone()
        pasted = torch.where(item_masked[:, None, None], recon, item_rows)
        hidden = torch.where(item_masked[:, None, None], torch.zeros_like(item_rows), item_rows)

        def frames(x):
            return unpatchify(x.reshape(-1, vc.patch_dim), grid, vc.patch_size, vc.temporal_patch_size,
                              vc.spatial_merge_size, vc.in_channels)

        results.append({"original": frames(item_rows), "masked": frames(hidden), "reconstruction": frames(recon),
                        "pasted": frames(pasted)})
    return results


def _to_uint8(frame: torch.Tensor, mean, std) -> np.ndarray:
    """``(C, H, W)`` normalised -> ``(H, W, C)`` uint8."""
    mean = torch.tensor(mean).view(-1, 1, 1)
    std = torch.tensor(std).view(-1, 1, 1)
    return ((frame * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def reconstruction_grid(items: list[dict[str, torch.Tensor]], mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                        temporal_patch_size: int = 2, max_frames_per_video: int = 4, pad: int = 4) -> Image.Image:
    """One row per image (and up to ``max_frames_per_video`` rows per video, one frame per temporal patch) with the
    four panels side by side."""
    panels = ("original", "masked", "reconstruction", "pasted")
    rows = []
    for item in items:
        T = item["original"].shape[0]
        frame_ids = list(range(0, T, temporal_patch_size))
        if len(frame_ids) > max_frames_per_video:
            frame_ids = [frame_ids[round(i * (len(frame_ids) - 1) / (max_frames_per_video - 1))]
                         for i in range(max_frames_per_video)]
        for f in frame_ids:
            rows.append([_to_uint8(item[p][f], mean, std) for p in panels])
    width = max(sum(p.shape[1] for p in r) + pad * (len(panels) + 1) for r in rows)
    height = sum(r[0].shape[0] for r in rows) + pad * (len(rows) + 1)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    y = pad
    for r in rows:
        x = pad
        for panel in r:
            canvas.paste(Image.fromarray(panel), (x, y))
            x += panel.shape[1] + pad
        y += r[0].shape[0] + pad
    return canvas


def save_reconstruction_grid(model: ArlowMAEForPreTraining, batch: dict, path: str | Path, seed: int = 0,
                             mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> Path:
    """Reconstruct a packed batch (the data pipeline's format) and write the PNG grid to ``path``."""
    items = reconstruct_items(model, batch["pixel_values"], batch["grid_thw"], seed=seed)
    image = reconstruction_grid(items, mean, std, model.config.vision_config.temporal_patch_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def side_by_side(paths: list[str | Path], labels: list[str], output: str | Path, gap: int = 12) -> Path:
    """Put PNG grids next to each other, each under its label (e.g. the first and the last checkpoint's)."""
    if len(paths) != len(labels) or not paths:
        raise ValueError("side_by_side needs one label per image and at least one image")
    images = [Image.open(p).convert("RGB") for p in paths]
    header = 16
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    canvas = Image.new("RGB", (width, header + max(im.height for im in images)), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for image, label in zip(images, labels):
        draw.text((x + 2, 2), label, fill="black")
        canvas.paste(image, (x, header))
        x += image.width + gap
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(output)
    return output


def run(args: argparse.Namespace) -> int:
    missing = [p for p in args.inputs if not Path(p).is_file()]
    if missing:  # before the weights load: a typo should not cost the model's loading time
        raise FileNotFoundError(f"--inputs {' '.join(missing)}: does not exist (give image or video files)")
    model, meta = load_mae_checkpoint(args.checkpoint)
    resolution = args.resolution or meta.get("resolution", 224)
    video_ext = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}
    images = [p for p in args.inputs if Path(p).suffix.lower() not in video_ext]
    videos = [p for p in args.inputs if Path(p).suffix.lower() in video_ext]
    batches = []
    for source, kwargs in ((images, {"images": images}), (videos, {"videos": videos})):
        if source:
            data = PretrainData(**kwargs, vision_config=model.config.vision_config, resolution=resolution,
                                clip_frames=args.clip_frames, frame_stride=1, augment=False, shuffle=False,
                                tokens_per_batch=10**9, epochs=1)
            batches.extend(data)
    items = []
    for batch in batches:
        items.extend(reconstruct_items(model, batch["pixel_values"], batch["grid_thw"], args.seed, args.mask_ratio))
    mean, std = image_normalisation()
    grid = reconstruction_grid(items, mean, std, model.config.vision_config.temporal_patch_size)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.output)
    print(f"wrote {args.output} ({len(items)} items)")
    return 0
