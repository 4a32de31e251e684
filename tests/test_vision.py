"""Tests of the vision encoder ``ArlowVLVisionModel`` (tiny configs, fp32, CPU).

Every numeric test compares two independent computations: a pack against its items run alone, eager against
SDPA, the model against a plain re-derivation written here from the definitions (convolution, complex-number
rotation, per-head loops, explicit distances), checkpointed against plain gradients, saved against reloaded.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

import arlow  # noqa: F401  (registers the Auto classes)
from arlow import ArlowVisionConfig, ArlowVisionModelOutput, ArlowVLVisionModel
from arlow.modeling.rope import (
    apply_rotary,
    mrope_slot_axes,
    multi_axis_angles,
    rope_inv_freq,
    vision_patch_positions,
)
from arlow.modeling.kernels import blocked_attention as blocked
from arlow.modeling.vision import locality_bias, normalized_coordinates, rotate_pairs
from arlow.processing.patches import patchify

P, TP, S = 2, 2, 2  # tiny patches keep the pixel rows short (C*Tp*P*P = 24)


@pytest.fixture
def tiny_model(tiny_config):
    """``tiny_model(attn, **overrides)``: a seeded encoder of the tiny vision config (conftest's ``tiny_config``)."""

    def make(attn="sdpa", **overrides) -> ArlowVLVisionModel:
        torch.manual_seed(0)
        config = tiny_config("vision", **overrides)
        model = ArlowVLVisionModel._from_config(config, attn_implementation=attn).eval()
        # A wider init than the default 0.02 so attention patterns and biases visibly matter in the outputs.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("weight") and p.dim() > 1:
                    p.normal_(0, 0.3)
                elif name.endswith("bias"):
                    p.normal_(0, 0.1)
        return model

    return make


def clip(t: int, h: int, w: int, seed: int) -> torch.Tensor:
    """A random clip of ``t`` frames of ``h x w`` pixels (channels first)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, 3, h, w, generator=g)


def pack(frames_list):
    """Patchify several clips and concatenate them: ``(rows (N, 24), grid (n, 3))``."""
    rows, grids = zip(*(patchify(f, P, TP, S) for f in frames_list))
    return torch.cat(rows), torch.stack(grids)


# Three image sizes (two items share a length so the grouped path reorders), and a video of 3 temporal patches.
ITEMS = [clip(2, 8, 12, 1), clip(2, 4, 4, 2), clip(6, 8, 8, 3), clip(2, 12, 8, 4), clip(2, 4, 4, 5)]


# ----------------------------------------------------------------------------------------------------------------
# An independent re-derivation of the forward pass for one item, straight from the definitions.


def reference_item(model: ArlowVLVisionModel, rows: torch.Tensor, positions: torch.Tensor, grid) -> dict:
    """Encode one item's rows (possibly a subset of whole windows) with plain per-head loops.

    Returns the merged output, the DeepStack features and the un-merged states after every block.
    """
    cfg = model.config
    E, H, D, s = cfg.embed_dim, cfg.num_heads, cfg.head_dim, cfg.spatial_merge_size
    C, Tp, Pp = cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    n = rows.shape[0]
    # Patch embedding as the actual 3-D convolution of each tubelet.
    x = F.conv3d(rows.view(n, C, Tp, Pp, Pp), sd["patch_embed.proj.weight"], stride=(Tp, Pp, Pp)).view(n, E)
    if cfg.num_position_embeddings:
        # The S x S table resized to the item's (h, w) grid by torch's bilinear interpolation, corners on corners.
        side = math.isqrt(cfg.num_position_embeddings)
        table = sd["pos_embed.weight"].t().reshape(1, E, side, side)
        resized = F.interpolate(table, size=(int(grid[1]), int(grid[2])), mode="bilinear", align_corners=True)[0]
        x = x + resized[:, positions[:, 1], positions[:, 2]].t()
    if cfg.use_progressive_patches:
        # Mean over the patches sharing a merge window, found from the coordinates (not from the row order).
        window_id = [(int(t), int(h) // s, int(w) // s) for t, h, w in positions]
        coarse = torch.stack([x[[j for j in range(n) if window_id[j] == window_id[i]]].mean(0) for i in range(n)])
        x = x + coarse @ sd["progressive_proj.weight"].t() + sd["progressive_proj.bias"]

    # Rotary angles per (row, frequency slot); the rotation is applied as a complex multiplication of the
    # channel pairs (c, c + D/2).
    inv_freq = cfg.rope_theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    axes = mrope_slot_axes(cfg.mrope_sections)
    angles = torch.stack([positions[:, a].double() for a in axes.tolist()], dim=1) * inv_freq  # (n, D/2)
    phase = torch.polar(torch.ones_like(angles), angles)

    def rotate(v):  # (n, D)
        z = torch.complex(v[:, : D // 2].double(), v[:, D // 2:].double()) * phase
        return torch.cat([z.real, z.imag], dim=1).float()

    bias = torch.zeros(n, n)
    if cfg.use_deformable_attention:
        t_, h_, w_ = (int(v) for v in grid)
        scale = torch.tensor([max(t_ - 1, 1), max(h_ - 1, 1), max(w_ - 1, 1)], dtype=torch.float64)
        c = positions.double() / scale
        for i in range(n):
            for j in range(n):
                d = math.sqrt(float(((c[i] - c[j]) ** 2).sum()))
                bias[i, j] = -cfg.deformable_attention_strength * d
                if cfg.deformable_attention_window > 0 and d > cfg.deformable_attention_window:
                    bias[i, j] -= 100 * cfg.deformable_attention_strength

    act = {"gelu_pytorch_tanh": lambda v: F.gelu(v, approximate="tanh")}[cfg.hidden_act]

    def merger(prefix, v):
        v = v.reshape(n // (s * s), s * s * E)
        v = F.layer_norm(v, (s * s * E,), sd[f"{prefix}.ln_q.weight"], sd[f"{prefix}.ln_q.bias"], 1e-6)
        v = F.gelu(v @ sd[f"{prefix}.mlp.0.weight"].t() + sd[f"{prefix}.mlp.0.bias"])
        return v @ sd[f"{prefix}.mlp.2.weight"].t() + sd[f"{prefix}.mlp.2.bias"]

    states, deepstack = [], []
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        hdn = F.layer_norm(x, (E,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], 1e-6)
        qkv = hdn @ sd[b + "attn.qkv.weight"].t() + sd[b + "attn.qkv.bias"]
        heads = []
        for h in range(H):
            q = rotate(qkv[:, h * D:(h + 1) * D])
            k = rotate(qkv[:, E + h * D:E + (h + 1) * D])
            v = qkv[:, 2 * E + h * D:2 * E + (h + 1) * D]
            heads.append(torch.softmax(q @ k.t() / math.sqrt(D) + bias, dim=-1) @ v)
        x = x + torch.cat(heads, dim=1) @ sd[b + "attn.proj.weight"].t() + sd[b + "attn.proj.bias"]
        hdn = F.layer_norm(x, (E,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], 1e-6)
        hdn = act(hdn @ sd[b + "fc1.weight"].t() + sd[b + "fc1.bias"])
        x = x + hdn @ sd[b + "fc2.weight"].t() + sd[b + "fc2.bias"]
        states.append(x)
        if i in cfg.deepstack_visual_indexes:
            deepstack.append(merger(f"deepstack_mergers.{cfg.deepstack_visual_indexes.index(i)}", x))
    return {"merged": merger("merger", x), "deepstack": deepstack, "states": states}


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("progressive", [False, True])
def test_matches_reference_derivation(tiny_model, bias, progressive):
    model = tiny_model(use_deformable_attention=bias, use_progressive_patches=progressive,
                       deepstack_visual_indexes=[0])
    rows, grid = pack([ITEMS[2]])  # a video: 3 temporal patches of 4x4
    out = model(rows, grid, output_hidden_states=True)
    ref = reference_item(model, rows, vision_patch_positions(grid, S), grid[0])
    torch.testing.assert_close(out.last_hidden_state, ref["merged"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.deepstack_features[0], ref["deepstack"][0], atol=1e-5, rtol=1e-4)
    for got, want in zip(out.hidden_states[1:], ref["states"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_locality_bias_changes_the_output_and_zero_strength_is_a_no_op(tiny_model):
    rows, grid = pack(ITEMS[:3])
    plain = tiny_model()(rows, grid).last_hidden_state
    biased = tiny_model(use_deformable_attention=True)(rows, grid).last_hidden_state
    assert (plain - biased).abs().max() > 1e-2
    off = tiny_model(use_deformable_attention=True, deformable_attention_strength=0.0,
                     deformable_attention_window=0.0)(rows, grid).last_hidden_state
    torch.testing.assert_close(off, plain, atol=1e-6, rtol=0)


def test_locality_bias_formula():
    coords = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.3, 0.4], [1.0, 1.0, 1.0]])
    got = locality_bias(coords, strength=3.0, window=0.45)
    for i in range(4):
        for j in range(4):
            d = math.dist(coords[i].tolist(), coords[j].tolist())
            want = -3.0 * d - (300.0 if d > 0.45 else 0.0)
            assert abs(float(got[i, j]) - want) < 1e-5 * max(1.0, abs(want)), (i, j)
    assert torch.equal(torch.diagonal(got), torch.zeros(4))
    no_window = locality_bias(coords, strength=3.0, window=0.0)
    assert float(no_window.min()) > -3.0 * math.sqrt(3) - 1e-5


def test_normalized_coordinates_use_full_extents():
    positions = torch.tensor([[0, 1, 3], [2, 0, 0]])
    extents = torch.tensor([[1, 4, 4], [3, 2, 8]])
    got = normalized_coordinates(positions, extents)
    torch.testing.assert_close(got, torch.tensor([[0.0, 1 / 3, 1.0], [1.0, 0.0, 0.0]]))


# (The 4x6 image has patch pairs exactly one locality window apart, where float32 and the reference's float64 may
# fall on either side of the cut-off, so it runs without the bias.)
@pytest.mark.parametrize("items, bias", [([2], True), ([0], False)], ids=["video-4x4", "image-4x6"])
def test_absolute_position_embedding_matches_reference_derivation(tiny_model, items, bias):
    model = tiny_model(use_deformable_attention=bias, use_progressive_patches=True, deepstack_visual_indexes=[0],
                       num_position_embeddings=9)
    rows, grid = pack([ITEMS[i] for i in items])
    out = model(rows, grid, output_hidden_states=True)
    ref = reference_item(model, rows, vision_patch_positions(grid, S), grid[0])
    torch.testing.assert_close(out.last_hidden_state, ref["merged"], atol=1e-5, rtol=1e-4)
    for got, want in zip(out.hidden_states[1:], ref["states"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_absolute_position_embedding_makes_content_depend_on_place(tiny_model):
    """The same patch content at two places embeds the same without the table (patch embedding and rotary are
    translation-equivariant) and differently with it; every frame of a clip gets the same embedding."""
    frames = torch.zeros(2, 3, 8, 8)
    frames[:, :, :2, :2] = 1.0  # one bright patch in the top-left corner ...
    moved = torch.zeros(2, 3, 8, 8)
    moved[:, :, 6:, 6:] = 1.0  # ... and in the bottom-right corner
    for table, differs in ((0, False), (16, True)):
        model = tiny_model(num_position_embeddings=table)
        first = model(*pack([frames]), output_hidden_states=True).hidden_states[0]
        second = model(*pack([moved]), output_hidden_states=True).hidden_states[0]
        positions = vision_patch_positions(torch.tensor([[1, 4, 4]]), S)
        corner_a = first[(positions[:, 1] == 0) & (positions[:, 2] == 0)]
        corner_b = second[(positions[:, 1] == 3) & (positions[:, 2] == 3)]
        assert torch.allclose(corner_a, corner_b, atol=1e-6) != differs
    video = tiny_model(num_position_embeddings=16)
    rows, grid = pack([clip(4, 8, 8, 7)])
    embedded = video(rows, grid, output_hidden_states=True).hidden_states[0] - video.patch_embed(rows)
    positions = vision_patch_positions(grid, S)
    torch.testing.assert_close(embedded[positions[:, 0] == 0], embedded[positions[:, 0] == 1])


def test_absolute_position_table_must_be_square(tiny_config):
    with pytest.raises(ValueError, match="square"):
        tiny_config("vision", num_position_embeddings=10)
    with pytest.raises(ValueError, match="embed_dim % 4"):
        tiny_config("vision", num_position_embeddings=16, embed_dim=18, num_heads=1)


# ----------------------------------------------------------------------------------------------------------------
# Packing


@pytest.mark.parametrize("bias, progressive, table",
                         [(False, False, 0), (False, True, 0), (True, False, 0), (True, True, 0), (True, True, 9)])
def test_packed_batch_equals_items_run_alone(tiny_model, bias, progressive, table):
    model = tiny_model(use_deformable_attention=bias, use_progressive_patches=progressive,
                       deepstack_visual_indexes=[0, 1], num_position_embeddings=table)
    rows, grid = pack(ITEMS)
    alone = [model(*pack([f]), output_hidden_states=True) for f in ITEMS]
    out = model(rows, grid, output_hidden_states=True)
    tokens = [int(g.prod()) // (S * S) for g in grid]
    assert out.last_hidden_state.shape == (sum(tokens), 20)
    torch.testing.assert_close(out.last_hidden_state, torch.cat([a.last_hidden_state for a in alone]),
                               atol=1e-5, rtol=1e-5)
    for k in range(2):
        torch.testing.assert_close(out.deepstack_features[k],
                                   torch.cat([a.deepstack_features[k] for a in alone]), atol=1e-5, rtol=1e-5)
    for layer in range(3):
        torch.testing.assert_close(out.hidden_states[layer],
                                   torch.cat([a.hidden_states[layer] for a in alone]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_eager_equals_sdpa(tiny_model, bias, monkeypatch):
    import arlow.modeling.vision as vision

    eager_calls = []
    real_eager = vision.eager_attention_forward
    monkeypatch.setattr(vision, "eager_attention_forward", lambda *a, **k: eager_calls.append(1) or real_eager(*a, **k))
    rows, grid = pack(ITEMS)
    sdpa = tiny_model("sdpa", use_deformable_attention=bias, use_progressive_patches=True)
    eager = tiny_model("eager", use_deformable_attention=bias, use_progressive_patches=True)
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    want = sdpa(rows, grid).last_hidden_state
    assert not eager_calls
    torch.testing.assert_close(want, eager(rows, grid).last_hidden_state, atol=1e-5, rtol=1e-5)
    assert eager_calls  # the eager path really ran
    sdpa.set_attn_implementation("eager")  # switching at run time works (no fallback forced by the bias)
    torch.testing.assert_close(sdpa(rows, grid).last_hidden_state, eager(rows, grid).last_hidden_state,
                               atol=1e-6, rtol=0)


def test_attention_blocks_fit_the_budget():
    attention_blocks = blocked.attention_blocks
    assert attention_blocks(heads=24, length=1024, element_size=2, budget=2 << 20) == (1, 1024)
    assert attention_blocks(heads=24, length=256, element_size=2, budget=2 << 20) == (16, 256)
    assert attention_blocks(heads=16, length=4096, element_size=2, budget=2 << 20) == (1, 256)
    assert attention_blocks(heads=6, length=100, element_size=2, budget=1 << 30) == (6, 100)  # everything at once
    assert attention_blocks(heads=6, length=100, element_size=2, budget=1) == (1, 16)  # at least 16 rows


@pytest.mark.parametrize("mask_heads", [None, 1, 3])
@pytest.mark.parametrize("budget", [1 << 30, 2 * 300 * 300 * 4, 32 * 300 * 4])
def test_blocked_attention_equals_the_formula(mask_heads, budget, monkeypatch):
    """Against fp64 softmax attention with no mask, a mask shared by the heads and a per-head mask. In fp32 (3
    heads, 300 rows): one block; blocks of 2 heads x 300 rows (a full head block and a partial one); blocks of
    1 head x 32 rows (nine full row blocks and a partial one). In bf16 its error is of the order of PyTorch's fused
    kernel's."""
    monkeypatch.setattr(blocked, "BLOCK_BYTES", budget)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 300, 16, generator=g) for _ in range(3))
    mask = None if mask_heads is None else -torch.rand(2, mask_heads, 300, 300, generator=g) * 4
    scores = q.double() @ k.double().transpose(-1, -2) * 0.25 + (0 if mask is None else mask.double())
    want = (torch.softmax(scores, -1) @ v.double()).transpose(1, 2)
    got, weights = blocked.blocked_attention(None, q, k, v, mask, scaling=0.25)
    assert weights is None and got.shape == (2, 300, 3, 16)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)

    bf = [t.bfloat16() for t in (q, k, v)]
    got_bf16, _ = blocked.blocked_attention(None, *bf, None if mask is None else mask.bfloat16(), scaling=0.25)
    fused = F.scaled_dot_product_attention(*bf, attn_mask=None if mask is None else mask.bfloat16(), scale=0.25)
    fused_error = (fused.transpose(1, 2).double() - want).abs().max()
    assert got_bf16.dtype == torch.bfloat16
    assert (got_bf16.double() - want).abs().max() <= 4 * fused_error + 1e-3


def test_blocked_attention_workspace_is_kept_and_works_in_both_no_grad_modes():
    """The scores/weights workspace is made once per thread and reused (no fresh pages per call); made under
    inference mode it still takes in-place writes under no_grad, and the other way round."""
    q, k, v = (torch.randn(1, 4, 200, 16).bfloat16() for _ in range(3))
    with torch.inference_mode():
        first, _ = blocked.blocked_attention(None, q, k, v, None, scaling=0.25)
        pointer = blocked._workspace.buffer.data_ptr()
    with torch.no_grad():
        second, _ = blocked.blocked_attention(None, q, k, v, None, scaling=0.25)
    assert blocked._workspace.buffer.data_ptr() == pointer
    assert torch.equal(first, second)
    scores, weights = blocked._attention_workspace(1000, torch.bfloat16)
    assert weights.data_ptr() - scores.data_ptr() == (1000 + blocked._WORKSPACE_GAP) * 2  # not a power of two apart


@pytest.mark.parametrize("bias", [False, True])
def test_arlow_blocked_cpu_runs_blocked_attention_only_where_chosen(tiny_model, bias, monkeypatch):
    """``attn_implementation="arlow_blocked_cpu"`` runs the blocked kernel in bf16 CPU inference, as close to the
    fp32 result as bf16 SDPA; ``"sdpa"`` never does (no silent swap); training and fp32 fall back to SDPA."""
    calls = []
    real = blocked.blocked_attention
    monkeypatch.setattr(blocked, "blocked_attention", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    monkeypatch.setattr(blocked, "BLOCK_BYTES", 1)  # blocks of one head x 16 rows at the tiny sizes
    rows, grid = pack(ITEMS)
    reference = tiny_model("eager", use_deformable_attention=bias)(rows, grid).last_hidden_state
    model = tiny_model("sdpa", use_deformable_attention=bias).to(torch.bfloat16)
    with torch.no_grad():
        fused = model(rows.bfloat16(), grid).last_hidden_state  # PyTorch's fused kernel, also in bf16
    assert not calls
    model.set_attn_implementation("arlow_blocked_cpu")
    with torch.no_grad():
        got = model(rows.bfloat16(), grid).last_hidden_state
    assert calls and any(shape[-2] > 16 for shape in calls)  # some items span several blocks
    assert (got.float() - reference).abs().max() <= 1.5 * (fused.float() - reference).abs().max()
    n_calls = len(calls)
    model(rows.bfloat16().requires_grad_(), grid).last_hidden_state.sum().backward()  # training: SDPA's kernel
    with torch.no_grad():
        model.float()(rows, grid)  # fp32: SDPA's kernel
    assert len(calls) == n_calls


@pytest.mark.parametrize("bias", [False, True])
def test_frame_attention_equals_each_temporal_slice_run_as_an_image(tiny_model, bias):
    """Under ``video_attention="frame"`` a video's temporal slices attend within themselves. RoPE scores depend only
    on offsets, so each slice must give what the same rows give as a one-slice item (an image) - other items too."""
    model = tiny_model(use_deformable_attention=bias, use_progressive_patches=True, deepstack_visual_indexes=[0],
                       video_attention="frame")
    rows, grid = pack(ITEMS)
    slices = [ITEMS[2][i:i + TP] for i in range(0, 6, TP)]  # the 6-frame clip as three 2-frame items
    as_images = ITEMS[:2] + slices + ITEMS[3:]
    rows_i, grid_i = pack(as_images)
    assert torch.equal(rows, rows_i) and grid_i.shape[0] == len(ITEMS) + 2
    with torch.no_grad():
        out, want = model(rows, grid), model(rows_i, grid_i)
    torch.testing.assert_close(out.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.deepstack_features[0], want.deepstack_features[0], atol=1e-5, rtol=1e-5)

    model.config.video_attention = "clip"  # the default: the clip attends as a whole, so its tokens change
    with torch.no_grad():
        clip_out = model(rows, grid).last_hidden_state
    video_tokens = slice(int(grid[:2].prod(-1).sum()) // 4, int(grid[:3].prod(-1).sum()) // 4)
    assert not torch.allclose(clip_out[video_tokens], out.last_hidden_state[video_tokens], atol=1e-3)
    torch.testing.assert_close(clip_out[: video_tokens.start], out.last_hidden_state[: video_tokens.start])


def test_temporal_slice_lengths(tiny_config):
    from arlow.modeling.vision import temporal_slice_lengths

    t = torch.tensor([0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1])
    assert temporal_slice_lengths(t, [6, 4, 2]) == [3, 3, 4, 2]  # an image is one slice; items never merge
    with pytest.raises(ValueError, match="grouped by temporal slice"):
        temporal_slice_lengths(torch.tensor([0, 1, 0, 1]), [4])
    with pytest.raises(ValueError, match="video_attention"):
        tiny_config("vision", video_attention="window")


@pytest.fixture
def varlen_reference():
    """A pure-torch stand-in for flash attention's varlen kernel, registered under a name containing "flash"."""
    calls = []

    def varlen(module, query, key, value, attention_mask, scaling, dropout=0.0, is_causal=None,
               cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
        assert query.shape[0] == 1 and attention_mask is None and is_causal is False
        assert torch.equal(cu_seq_lens_q, cu_seq_lens_k) and cu_seq_lens_q.dtype == torch.int32
        calls.append((cu_seq_lens_q.tolist(), max_length_q))
        out = []
        for a, b in zip(cu_seq_lens_q[:-1].tolist(), cu_seq_lens_q[1:].tolist()):
            q, k, v = (t[:, :, a:b] for t in (query, key, value))
            out.append(torch.softmax(q @ k.transpose(-1, -2) * scaling, dim=-1) @ v)
        return torch.cat(out, dim=2).transpose(1, 2), None

    AttentionInterface.register("flash_varlen_reference", varlen)
    yield calls
    ALL_ATTENTION_FUNCTIONS._global_mapping.pop("flash_varlen_reference", None)


def test_flash_path_is_one_varlen_call_per_layer(tiny_model, varlen_reference):
    rows, grid = pack(ITEMS)
    model = tiny_model(use_progressive_patches=True)
    want = model(rows, grid).last_hidden_state
    # set_attn_implementation would try to import a flash kernel for any name containing "flash"; the config field
    # is what the attention layers read.
    model.config._attn_implementation = "flash_varlen_reference"
    got = model(rows, grid).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    lengths = grid.prod(dim=1).tolist()
    cu = [0] + torch.tensor(lengths).cumsum(0).tolist()
    assert varlen_reference == [(cu, max(lengths))] * model.config.depth


def test_flash_path_with_frame_attention_splits_the_clip(tiny_model, varlen_reference):
    rows, grid = pack(ITEMS)
    model = tiny_model(video_attention="frame")
    want = model(rows, grid).last_hidden_state
    model.config._attn_implementation = "flash_varlen_reference"
    torch.testing.assert_close(model(rows, grid).last_hidden_state, want, atol=1e-5, rtol=1e-5)
    per_slice = grid[:, 1:].prod(dim=1)
    lengths = torch.repeat_interleave(per_slice, grid[:, 0]).tolist()  # the 3-slice video: three units
    assert len(lengths) == len(ITEMS) + 2
    assert varlen_reference[0] == ([0] + torch.tensor(lengths).cumsum(0).tolist(), max(lengths))


def test_flash_with_locality_bias_raises(tiny_model, varlen_reference):
    model = tiny_model(use_deformable_attention=True)
    model.config._attn_implementation = "flash_varlen_reference"
    with pytest.raises(ValueError, match="arlow_flex"):
        model(*pack(ITEMS[:1]))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("video_attention", ["clip", "frame"])
def test_flex_kernel_equals_eager_with_packing_and_locality_bias(tiny_model, bias, video_attention):
    """``attn_implementation="arlow_flex"``: one flex_attention call over the whole pack (block mask per item, the
    locality bias as a score modification) gives eager attention's output to fp32 rounding (CPU: flex's eager
    reference; the same score/mask functions compile into one kernel on GPUs)."""
    eager = tiny_model("eager", use_deformable_attention=bias, use_progressive_patches=True,
                       deepstack_visual_indexes=[0], video_attention=video_attention)
    flex = tiny_model("arlow_flex", use_deformable_attention=bias, use_progressive_patches=True,
                      deepstack_visual_indexes=[0], video_attention=video_attention)
    rows, grid = pack(ITEMS)
    with torch.no_grad():
        want, got = eager(rows, grid), flex(rows, grid)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.deepstack_features[0], want.deepstack_features[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no backward on CPU"):
        flex.train()(rows, grid)


@pytest.mark.slow
def test_compiled_flex_kernel_equals_its_eager_reference(monkeypatch):
    """The compiled kernel (what GPUs run; inductor compiles flex for CPUs too) on a pack of unequal items with the
    locality bias gives what flex's eager reference gives. Guards the score modification's form: reading an
    ``(N, 3)`` coordinate table as ``c[q][axis]`` compiled into wrong scores (max error 3.3 here) while eager was
    right. One length only: CPU inductor (torch 2.13) cannot compile flex with a symbolic length, which the GPU
    kernel uses from the second length on (scripts/gpu_check.py checks that on the device). About 15 s."""
    from arlow.modeling.kernels import flex_attention as flex

    torch._dynamo.reset()
    eager = flex.flex_attention_eager()
    g = torch.Generator().manual_seed(0)
    lengths = [96, 64, 32, 64]
    n = sum(lengths)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for _ in range(3))
    cu = torch.tensor([0] + lengths).cumsum(0)
    coords = torch.rand(n, 3, generator=g)
    with torch.no_grad():
        monkeypatch.setattr(flex, "_flex", lambda device: eager)
        want = flex.pack_attention(q, k, v, cu, 0.25, coords, 4.0, 0.25)
        monkeypatch.setattr(flex, "_flex", lambda device: flex._compiled_flex())
        got = flex.pack_attention(q, k, v, cu, 0.25, coords, 4.0, 0.25)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and the reference itself is item-local: the first item alone gives its rows
    with torch.no_grad():
        monkeypatch.setattr(flex, "_flex", lambda device: eager)
        alone = flex.pack_attention(q[:, :, :96], k[:, :, :96], v[:, :, :96], cu[:2], 0.25, coords[:96], 4.0, 0.25)
    torch.testing.assert_close(want[:, :96], alone, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# RoPE


def test_rotation_preserves_norms_and_depends_only_on_offsets(tiny_config):
    cfg = tiny_config("vision", embed_dim=24, num_heads=2, mrope_sections=[4, 4, 4])  # D = 12
    D = cfg.head_dim
    inv_freq = rope_inv_freq(D, cfg.rope_theta)
    axes = mrope_slot_axes(cfg.mrope_sections)

    def rotated(v, pos):
        a = multi_axis_angles(torch.tensor(pos, dtype=torch.float64), inv_freq, axes)
        a = torch.cat([a, a], dim=-1)
        return apply_rotary(v, a.cos(), a.sin())

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(D, generator=g), torch.randn(D, generator=g)
    p, r = [1, 5, 2], [3, 0, 7]
    for shift in ([0, 0, 0], [4, 0, 0], [0, 9, 0], [0, 0, 13], [2, 3, 6]):
        ps = [a + b for a, b in zip(p, shift)]
        rs = [a + b for a, b in zip(r, shift)]
        assert torch.allclose(rotated(q, ps).norm(), q.norm(), atol=1e-5)
        assert torch.allclose(rotated(q, ps) @ rotated(k, rs), rotated(q, p) @ rotated(k, r), atol=1e-4)
    # ... and the score does change with the offset along every axis.
    for axis in range(3):
        moved = list(r)
        moved[axis] += 1
        assert abs(float(rotated(q, p) @ rotated(k, moved) - rotated(q, p) @ rotated(k, r))) > 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_pairs_equals_apply_rotary(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 2, 3, 8, generator=g).to(dtype)
    angles = torch.rand(10, 1, 1, 4, generator=g) * 20
    want = apply_rotary(x, torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin())
    got = rotate_pairs(x, angles.cos(), angles.sin())
    assert got.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: at most one rounding step apart
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_rotate_pairs_gradient():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 2, 6, dtype=torch.float64, generator=g, requires_grad=True)
    angles = torch.rand(5, 1, 3, dtype=torch.float64, generator=g) * 10
    assert torch.autograd.gradcheck(lambda v: rotate_pairs(v, angles.cos(), angles.sin()), (x,))


def test_model_rotary_table_uses_config_theta_in_fp32(tiny_model):
    model = tiny_model(rope_theta=50.0)
    pos = vision_patch_positions(torch.tensor([[2, 4, 8]]), S)
    cos, sin = model.rotary_pos_emb(pos)
    D = model.config.head_dim
    assert cos.shape == (64, D // 2) and cos.dtype == torch.float32
    want = multi_axis_angles(pos, rope_inv_freq(D, 50.0), mrope_slot_axes(model.config.mrope_sections))
    torch.testing.assert_close(cos, want.cos())
    torch.testing.assert_close(sin, want.sin())
    # A bf16 cast of the model does not round the frequencies.
    cos16, _ = model.to(torch.bfloat16).rotary_pos_emb(pos)
    assert torch.equal(cos16, cos)


# ----------------------------------------------------------------------------------------------------------------
# Visible subsets (masked autoencoding)


def windows_of(grid_row) -> torch.Tensor:
    """``(n_windows, s*s, 3)`` positions of every merge window of one item, in window order."""
    return vision_patch_positions(grid_row[None], S).view(-1, S * S, 3)


def test_all_windows_in_shuffled_order_permute_the_tokens(tiny_model):
    model = tiny_model(use_deformable_attention=True, use_progressive_patches=True, deepstack_visual_indexes=[0])
    rows, grid = pack(ITEMS[:3])
    full = model(rows, grid)
    g = torch.Generator().manual_seed(1)
    perm_rows, positions, token_perm, offset_rows, offset_tok = [], [], [], 0, 0
    for item in range(3):
        n_win = int(grid[item].prod()) // (S * S)
        perm = torch.randperm(n_win, generator=g)
        perm_rows.append((offset_rows + perm[:, None] * S * S + torch.arange(S * S)).reshape(-1))
        positions.append(windows_of(grid[item])[perm].reshape(-1, 3))
        token_perm.append(offset_tok + perm)
        offset_rows += n_win * S * S
        offset_tok += n_win
    idx = torch.cat(perm_rows)
    out = model(rows[idx], grid, patch_positions=torch.cat(positions), seq_lengths=grid.prod(dim=1))
    token_perm = torch.cat(token_perm)
    torch.testing.assert_close(out.last_hidden_state, full.last_hidden_state[token_perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.deepstack_features[0], full.deepstack_features[0][token_perm], atol=1e-5,
                               rtol=1e-5)


def test_visible_subset_matches_reference(tiny_model):
    model = tiny_model(use_deformable_attention=True, use_progressive_patches=True, deepstack_visual_indexes=[1])
    g = torch.Generator().manual_seed(2)
    items = [ITEMS[0], ITEMS[2], ITEMS[3]]
    rows_all, positions, lengths, refs = [], [], [], []
    grids = []
    for frames in items:
        rows, grid = patchify(frames, P, TP, S)
        wins = windows_of(grid)
        keep = torch.randperm(wins.shape[0], generator=g)[: max(1, wins.shape[0] // 3)].sort().values
        sel = (keep[:, None] * S * S + torch.arange(S * S)).reshape(-1)
        pos = wins[keep].reshape(-1, 3)
        rows_all.append(rows[sel])
        positions.append(pos)
        lengths.append(sel.numel())
        grids.append(grid)
        refs.append(reference_item(model, rows[sel], pos, grid))
    out = model(torch.cat(rows_all), torch.stack(grids), patch_positions=torch.cat(positions),
                seq_lengths=torch.tensor(lengths))
    torch.testing.assert_close(out.last_hidden_state, torch.cat([r["merged"] for r in refs]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.deepstack_features[0], torch.cat([r["deepstack"][0] for r in refs]),
                               atol=1e-5, rtol=1e-4)


def test_subset_bias_uses_full_grid_extents(tiny_model):
    """The same visible windows inside a bigger grid are further apart in normalised units: the output changes."""
    model = tiny_model(use_deformable_attention=True)
    rows, grid = patchify(ITEMS[0][:, :, :8, :8], P, TP, S)  # a 4x4 patch grid
    pos = vision_patch_positions(grid[None], S)
    small = model(rows, grid[None]).last_hidden_state
    same = model(rows, grid[None], patch_positions=pos, seq_lengths=torch.tensor([16])).last_hidden_state
    torch.testing.assert_close(same, small, atol=0, rtol=0)
    inside_bigger = model(rows, torch.tensor([[1, 8, 8]]), patch_positions=pos,
                          seq_lengths=torch.tensor([16])).last_hidden_state
    assert (inside_bigger - small).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# Training: gradients and checkpointing


def loss_of(model, rows, grid):
    out = model(rows, grid)
    return out.last_hidden_state.square().mean() + sum(d.square().mean() for d in out.deepstack_features)


def test_gradient_reaches_every_parameter(tiny_model):
    model = tiny_model(use_deformable_attention=True, use_progressive_patches=True,
                       deepstack_visual_indexes=[0, 1]).train()
    loss_of(model, *pack(ITEMS)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    rows, grid = pack(ITEMS)
    model = tiny_model(use_deformable_attention=True, use_progressive_patches=True,
                       deepstack_visual_indexes=[0]).train()
    loss_of(model, rows, grid).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert all(block.gradient_checkpointing for block in model.blocks)
    forwards = []
    hook = model.blocks[0].attn.register_forward_hook(lambda *a: forwards.append(1))
    loss_of(model, rows, grid).backward()
    hook.remove()
    assert len(forwards) == 2  # the block ran again during backward: checkpointing is really on
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], atol=1e-6, rtol=1e-5, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# Save / load, Auto classes, names and sizes


def test_save_and_load_reproduce_outputs(tiny_model, tmp_path):
    model = tiny_model(use_deformable_attention=True, use_progressive_patches=True, depth=6,
                       deepstack_visual_indexes=None)
    assert len(model.deepstack_mergers) == 3
    rows, grid = pack(ITEMS)
    want = model(rows, grid)
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, ArlowVisionConfig)

    def fields(c):
        return {k: v for k, v in c.to_dict().items() if k != "_name_or_path"}

    assert fields(config) == fields(model.config)
    for loader in (ArlowVLVisionModel, AutoModel):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert type(loaded) is ArlowVLVisionModel
        got = loaded(rows, grid)
        assert torch.equal(got.last_hidden_state, want.last_hidden_state)
        for a, b in zip(got.deepstack_features, want.deepstack_features, strict=True):
            assert torch.equal(a, b)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "model.safetensors"))
    assert "rotary_pos_emb.inv_freq" not in saved and set(saved) == set(model.state_dict())


def expected_keys(depth: int, deepstack: int) -> list[str]:
    keys = ["patch_embed.proj.weight"]
    for i in range(depth):
        keys += [f"blocks.{i}.{name}" for name in (
            "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.qkv.weight", "attn.qkv.bias",
            "attn.proj.weight", "attn.proj.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")]
    merger = ["ln_q.weight", "ln_q.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]
    keys += [f"merger.{n}" for n in merger]
    keys += ["progressive_proj.weight", "progressive_proj.bias"]
    keys += [f"deepstack_mergers.{k}.{n}" for k in range(deepstack) for n in merger]
    return keys


def test_parameter_names_and_shapes_follow_the_fork(tiny_config):
    cfg = tiny_config("vision", depth=6, deepstack_visual_indexes=None, use_deformable_attention=True,
                      use_progressive_patches=True)
    assert cfg.deepstack_visual_indexes == [1, 2, 3]
    model = ArlowVLVisionModel(cfg)
    keys = list(model.state_dict())
    assert keys == expected_keys(6, 3)  # 99 keys, as the fork's depth-6 checkpoint
    assert len(keys) == 99
    E, M = cfg.embed_dim, cfg.embed_dim * S * S
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["patch_embed.proj.weight"] == (E, 3, TP, P, P)
    assert shapes["blocks.0.attn.qkv.weight"] == (3 * E, E)
    assert shapes["blocks.0.fc1.weight"] == (int(E * cfg.mlp_ratio), E)
    assert shapes["merger.ln_q.weight"] == (M,)
    assert shapes["merger.mlp.2.weight"] == (cfg.hidden_size, M)
    assert shapes["deepstack_mergers.2.mlp.0.weight"] == (M, M)
    plain = ArlowVLVisionModel(tiny_config("vision", depth=2))
    assert not any(k.startswith(("progressive_proj", "deepstack_mergers")) for k in plain.state_dict())


def test_published_parameter_count_on_meta():
    with torch.device("meta"):
        model = ArlowVLVisionModel(ArlowVisionConfig())
        without = ArlowVLVisionModel(ArlowVisionConfig(use_progressive_patches=False))
    assert sum(p.numel() for p in model.parameters()) == 1_590_658_560
    assert sum(p.numel() for p in without.parameters()) == 1_588_297_728


def test_class_attributes(tiny_model):
    assert ArlowVLVisionModel.main_input_name == "pixel_values"
    assert ArlowVLVisionModel.input_modalities == ("image", "video")
    assert ArlowVLVisionModel._no_split_modules == ["ArlowVLBlock"]
    assert ArlowVLVisionModel.supports_gradient_checkpointing
    assert ArlowVLVisionModel._supports_sdpa and ArlowVLVisionModel._supports_flash_attn
    assert ArlowVLVisionModel._can_set_attn_implementation()
    assert tiny_model().blocks[0].attn.is_causal is False


def test_init_weights(tiny_config):
    model = ArlowVLVisionModel(tiny_config("vision", initializer_range=0.05, use_progressive_patches=True))
    assert torch.equal(model.blocks[0].norm1.weight, torch.ones(24))
    assert torch.equal(model.merger.ln_q.bias, torch.zeros(96))
    assert torch.equal(model.blocks[1].fc1.bias, torch.zeros_like(model.blocks[1].fc1.bias))
    w = torch.cat([model.blocks[0].attn.qkv.weight.flatten(), model.patch_embed.proj.weight.flatten()]).detach()
    assert 0.04 < float(w.std()) < 0.06 and abs(float(w.mean())) < 0.01


# ----------------------------------------------------------------------------------------------------------------
# Outputs, dtypes


def test_outputs_tuple_and_hidden_states(tiny_model):
    model = tiny_model(use_progressive_patches=True, deepstack_visual_indexes=[1])
    rows, grid = pack(ITEMS[:2])
    out = model(rows, grid, output_hidden_states=True)
    assert isinstance(out, ArlowVisionModelOutput)
    assert len(out.hidden_states) == model.config.depth + 1
    assert all(h.shape == (rows.shape[0], 24) for h in out.hidden_states)
    # DeepStack level k is its merger applied to the state after block deepstack_visual_indexes[k].
    torch.testing.assert_close(out.deepstack_features[0], model.deepstack_mergers[0](out.hidden_states[2]))
    torch.testing.assert_close(out.last_hidden_state, model.merger(out.hidden_states[-1]))
    tup = model(rows, grid, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], out.last_hidden_state)
    assert len(tup[1]) == 1 and torch.equal(tup[1][0], out.deepstack_features[0])


def test_pixel_values_cast_to_weight_dtype(tiny_model):
    model = tiny_model()
    rows, grid = pack(ITEMS[:2])
    want = model(rows, grid).last_hidden_state
    torch.testing.assert_close(model(rows.double(), grid).last_hidden_state, want)
    model = model.to(torch.bfloat16)
    got = model(rows, grid).last_hidden_state  # fp32 rows into a bf16 encoder
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.15, rtol=0.1)


# ----------------------------------------------------------------------------------------------------------------
# Bad input


def _bad_cases():
    rows, grid = pack(ITEMS[:2])  # grids [1,4,6] and [1,2,2]: 24 + 4 rows
    pos = vision_patch_positions(grid, S)
    lengths = grid.prod(dim=1)
    swapped = pos.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    dup = pos.clone()
    dup[4:8] = dup[0:4]
    return {
        "3-D pixels": ((rows[None], grid), "N_patches, C\\*Tp\\*P\\*P"),
        "row width": ((rows[:, :20], grid), "C\\*Tp\\*P\\*P = 3\\*2\\*2\\*2 = 24"),
        "empty": ((rows[:0], grid), "empty"),
        "grid shape": ((rows, grid[:, :2]), "\\(n_items, 3\\)"),
        "grid empty": ((rows, grid[:0]), "\\(n_items, 3\\)"),
        "grid float": ((rows, grid.float()), "integers"),
        "grid zero": ((rows, torch.tensor([[1, 4, 6], [0, 2, 2]])), ">= 1"),
        "odd h": ((torch.randn(27, 24), torch.tensor([[1, 3, 6], [1, 3, 3]])), "multiples of spatial_merge_size"),
        "row count": ((rows[:-4], grid), "describes 28 patches"),
        "seq_lengths without positions": ((rows, grid, None, torch.tensor([20, 8])), "t\\*h\\*w"),
        "positions without lengths": ((rows, grid, pos, None), "needs seq_lengths"),
        "lengths sum": ((rows, grid, pos, torch.tensor([24, 8])), "sum to 32"),
        "lengths not windows": ((rows[:26], grid, pos[:26], torch.tensor([22, 4])), "multiple of"),
        "lengths shape": ((rows, grid, pos, lengths[:1]), "\\(n_items,\\)"),
        "positions shape": ((rows, grid, pos[:, :2], lengths), "\\(N_patches, 3\\)"),
        "positions outside": ((rows, grid, pos + torch.tensor([0, 0, 6]), lengths), "outside"),
        "positions not windows": ((rows, grid, swapped, lengths), "whole 2x2 merge windows"),
        "duplicate window": ((rows, grid, dup, lengths), "more than once"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_raises_value_error(tiny_model, case):
    args, message = _bad_cases()[case]
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        model(*args[:2], patch_positions=args[2] if len(args) > 2 else None,
              seq_lengths=args[3] if len(args) > 3 else None)


# ----------------------------------------------------------------------------------------------------------------
# FLOPs


def test_flop_formula_matches_the_anchors_and_the_layers(tiny_config):
    from arlow.modeling.flops import linear_flops, transformer_block_flops
    from arlow.modeling.vision import vision_forward_flops

    # peers-and-anchors C.1: ViT-B/16 at 224 px (197 tokens) = 35.13 GFLOPs forward, ViT-L/16 = 123.1.
    assert (linear_flops(197, 768, 768) + 12 * transformer_block_flops([197], 768, 3072)) / 1e9 == \
        pytest.approx(35.13, abs=0.01)
    assert (linear_flops(197, 768, 1024) + 24 * transformer_block_flops([197], 1024, 4096)) / 1e9 == \
        pytest.approx(123.1, abs=0.05)
    # Packed items do not attend across: two 100-token items cost less attention than one 200-token sequence.
    assert transformer_block_flops([100, 100], 64, 256) < transformer_block_flops([200], 64, 256)
    # The encoder's formula counts 2 FLOPs per multiply-add of every matrix its modules hold, plus attention.
    cfg = tiny_config("vision", use_progressive_patches=True, deepstack_visual_indexes=[0])
    model = ArlowVLVisionModel(cfg)
    lengths = [32, 16]
    rows, tokens = sum(lengths), sum(lengths) // (S * S)
    per_row = sum(m.weight.numel() for name, m in model.named_modules()
                  if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d)) and "merger" not in name)
    per_token = sum(m.weight.numel() for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and "merger" in name)
    attention = cfg.depth * 4 * cfg.embed_dim * sum(n * n for n in lengths)
    assert vision_forward_flops(cfg, lengths) == 2 * rows * per_row + 2 * tokens * per_token + attention


def test_position_table_starts_as_the_sine_cosine_table(tiny_config):
    """The learned table is initialised with MAE's 2-D sine-cosine table (recomputed here from its definition), so
    position is in the tokens from the first step (a random table of the weights' 0.02 scale drowned under the
    patch content in the shapes demonstration)."""
    cfg = tiny_config("vision", num_position_embeddings=9)
    model = ArlowVLVisionModel(cfg)
    side, dim = 3, cfg.embed_dim
    quarter = dim // 4
    want = torch.empty(side * side, dim)
    for h in range(side):
        for w in range(side):
            for k in range(quarter):
                f = 10000.0 ** (-k / quarter)
                want[h * side + w, k], want[h * side + w, quarter + k] = math.sin(h * f), math.cos(h * f)
                want[h * side + w, 2 * quarter + k], want[h * side + w, 3 * quarter + k] = math.sin(w * f), math.cos(w * f)
    torch.testing.assert_close(model.pos_embed.weight.detach(), want)
    # position_embedding_scale multiplies the initial table - also when the encoder is built inside the MAE model,
    # whose own _init_weights has no vision config
    from arlow.pretrain.mae import ArlowMAEConfig, ArlowMAEForPreTraining

    scaled = ArlowVLVisionModel(tiny_config("vision", num_position_embeddings=9, position_embedding_scale=4.0))
    torch.testing.assert_close(scaled.pos_embed.weight.detach(), 4.0 * want)
    mae = ArlowMAEForPreTraining(ArlowMAEConfig(vision_config=tiny_config("vision", num_position_embeddings=9,
                                                                          position_embedding_scale=4.0).to_dict()))
    torch.testing.assert_close(mae.encoder.pos_embed.weight.detach(), 4.0 * want)
    with pytest.raises(ValueError, match="position_embedding_scale"):
        tiny_config("vision", num_position_embeddings=9, position_embedding_scale=0.0)
