"""Pure position and patch arithmetic: rotations, slot layouts, merge-window order, patchify round trips."""

import pytest
import torch

from arlow.modeling.rope import (apply_rotary, cu_seqlens_from_lengths, mrope_slot_axes, multi_axis_angles,
                                 rope_inv_freq, vision_patch_positions)
from arlow.processing.patches import pad_frames, patchify, unpatchify


def _table(positions, head_dim=16, sections=(4, 6, 6)):
    angles = multi_axis_angles(positions, rope_inv_freq(head_dim, 10000.0), mrope_slot_axes(list(sections)))
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def test_rotation_preserves_norm():
    x = torch.randn(10, 16)
    cos, sin = _table(torch.randint(0, 50, (10, 3)))
    assert torch.allclose(apply_rotary(x, cos, sin).norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_scores_depend_only_on_relative_offset():
    q, k = torch.randn(16), torch.randn(16)

    def score(pq, pk):
        cq, sq = _table(torch.tensor(pq))
        ck, sk = _table(torch.tensor(pk))
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    base = score([3, 5, 7], [1, 2, 3])
    shifted = score([13, 25, 17], [11, 22, 13])  # same (dt, dh, dw) offset
    assert torch.allclose(base, shifted, atol=1e-4)
    assert not torch.allclose(base, score([3, 5, 8], [1, 2, 3]), atol=1e-3)


def test_slot_axes_counts_and_interleave():
    axes = mrope_slot_axes([20, 22, 22])
    assert axes.tolist()[:6] == [0, 1, 2, 0, 1, 2]
    assert torch.bincount(axes).tolist() == [10, 11, 11]


def test_equal_axes_equal_one_axis():
    pos = torch.arange(7)
    cos3, sin3 = _table(pos[:, None].expand(7, 3))
    inv = rope_inv_freq(16, 10000.0)
    emb = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)
    assert torch.allclose(cos3, emb.cos()) and torch.allclose(sin3, emb.sin())


def test_patch_positions_merge_window_order():
    pos = vision_patch_positions(torch.tensor([[1, 2, 4], [2, 2, 2]]), 2)
    assert pos.shape == (8 + 8, 3)
    assert pos[:8].tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [0, 0, 2], [0, 0, 3], [0, 1, 2], [0, 1, 3]]
    assert pos[8:12].tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]] and pos[12].tolist() == [1, 0, 0]
    assert cu_seqlens_from_lengths(torch.tensor([8, 8])).tolist() == [0, 8, 16]


def test_patchify_rows_match_positions_and_round_trip():
    frames = torch.randn(4, 3, 56, 84)
    rows, grid = patchify(frames, 14, 2, 2)
    assert rows.shape == (2 * 4 * 6, 3 * 2 * 14 * 14) and grid.tolist() == [2, 4, 6]
    for n, (t, h, w) in enumerate(vision_patch_positions(grid[None], 2).tolist()):
        block = frames[2 * t:2 * t + 2, :, 14 * h:14 * h + 14, 14 * w:14 * w + 14].permute(1, 0, 2, 3)
        assert torch.equal(rows[n], block.reshape(-1))
    assert torch.equal(unpatchify(rows, grid, 14, 2, 2), frames)


def test_patchify_errors_and_padding():
    with pytest.raises(ValueError, match="temporal patch"):
        patchify(torch.zeros(3, 3, 28, 28), 14, 2, 2)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        patchify(torch.zeros(2, 3, 42, 28), 14, 2, 2)
    padded = pad_frames(torch.arange(3.0).view(3, 1), 2)
    assert padded.view(-1).tolist() == [0, 1, 2, 2]
    assert pad_frames(torch.ones(1, 2), 2).shape[0] == 2
    with pytest.raises(ValueError, match="no frames"):
        pad_frames(torch.zeros(0, 2), 2)
