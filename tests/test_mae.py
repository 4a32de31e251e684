"""MAE model: masking, loss, what the encoder sees, gradients, FLOP accounting."""

import math

import pytest
import torch

from arlow.configuration import default_mrope_sections
from arlow.modeling.rope import apply_rotary, mrope_slot_axes
from arlow.pretrain.mae import ArlowMAEForPreTraining, mae_train_flops
from arlow.pretrain.masking import sample_window_mask, window_positions, windows_per_slice
from arlow.processing.patches import patchify


def batch():
    """An image 56x84 (2x3 windows) and a 4-frame video 56x56 (t=2, 2x2 windows)."""
    g = torch.Generator().manual_seed(0)
    r1, g1 = patchify(torch.randn(2, 3, 56, 84, generator=g), 14, 2, 2)
    r2, g2 = patchify(torch.randn(4, 3, 56, 56, generator=g), 14, 2, 2)
    return torch.cat([r1, r2]), torch.stack([g1, g2])


def test_mask_ratio_tubes_and_determinism():
    grid = torch.tensor([[1, 8, 8], [4, 8, 12]])
    noise = torch.rand(int(windows_per_slice(grid, 2).sum()))
    m1 = sample_window_mask(grid, 2, 0.75, noise)
    m2 = sample_window_mask(grid, 2, 0.75, noise.clone())
    assert torch.equal(m1.masked, m2.masked) and torch.equal(m1.visible_rows, m2.visible_rows)
    image, video = m1.masked[:16], m1.masked[16:].view(4, 24)
    assert int((~image).sum()) == 4 and int((~video).sum()) == 4 * 6  # 25% of windows per slice visible
    assert all(torch.equal(video[0], video[t]) for t in range(4))  # tube masking
    # the smallest noise scores are the visible windows
    assert set(torch.nonzero(~image).view(-1).tolist()) == set(torch.argsort(noise[:16])[:4].tolist())
    assert m1.visible_lengths.tolist() == [16, 96]
    with pytest.raises(ValueError, match="noise must have shape"):
        sample_window_mask(grid, 2, 0.75, torch.rand(3))
    with pytest.raises(ValueError, match="mask_ratio"):
        sample_window_mask(grid, 2, 1.0)


def test_visible_rows_are_whole_windows():
    grid = torch.tensor([[2, 4, 6]])
    m = sample_window_mask(grid, 2, 0.5, torch.arange(6.0))
    rows = m.visible_rows.view(-1, 4)
    assert torch.equal(rows % 4, torch.arange(4).expand_as(rows))  # each window's 4 rows, in order
    windows = (rows[:, 0] // 4).tolist()
    assert windows == [0, 1, 2, 6, 7, 8]  # windows 0..2 visible in both temporal slices
    assert window_positions(grid, 2)[windows].tolist()[3] == [1, 0, 0]


def test_loss_matches_hand_computation(tiny_config):
    torch.manual_seed(0)
    model = ArlowMAEForPreTraining(tiny_config("mae")).eval()
    pv, grid = batch()
    noise = torch.rand(int(windows_per_slice(grid, 2).sum()))
    with torch.no_grad():
        out = model(pv, grid, noise=noise)
    rows = pv.view(-1, 4, pv.shape[-1])
    total, count = 0.0, 0
    for w in range(rows.shape[0]):
        if not out.mask[w]:
            continue
        for p in range(4):
            x = rows[w, p].double()
            mean = sum(x.tolist()) / len(x)
            var = sum((v - mean) ** 2 for v in x.tolist()) / (len(x) - 1)
            target = (x - mean) / math.sqrt(var + 1e-6)
            total += float(((out.pred[w, p].double() - target) ** 2).mean())
            count += 1
    assert count == 4 * int(out.mask.sum())
    assert abs(float(out.loss) - total / count) < 1e-5


def test_encoder_sees_only_visible_windows(tiny_config):
    model = ArlowMAEForPreTraining(tiny_config("mae")).eval()
    pv, grid = batch()
    noise = torch.rand(int(windows_per_slice(grid, 2).sum()))
    out = model(pv, grid, noise=noise)
    masked_rows = out.mask.repeat_interleave(4)
    changed = pv.clone()
    changed[masked_rows] = torch.randn_like(changed[masked_rows])
    out2 = model(changed, grid, noise=noise)
    assert torch.equal(out.pred, out2.pred)  # predictions never look at hidden pixels
    assert not torch.allclose(out.loss, out2.loss)  # ...but the target does


def test_one_step_moves_every_exported_parameter(tiny_config):
    model = ArlowMAEForPreTraining(tiny_config("mae"))
    pv, grid = batch()
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(pv, grid).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    opt.step()
    unchanged = [k for k, v in model.encoder.state_dict().items() if torch.equal(v, before[k])]
    assert unchanged == []


def test_gradient_checkpointing_same_gradients(tiny_config):
    torch.manual_seed(0)
    model = ArlowMAEForPreTraining(tiny_config("mae"))
    pv, grid = batch()
    noise = torch.rand(int(windows_per_slice(grid, 2).sum()))
    model(pv, grid, noise=noise).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(pv, grid, noise=noise).loss.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref[n], atol=1e-6), n


def test_save_load_round_trip(tiny_config, tmp_path):
    model = ArlowMAEForPreTraining(tiny_config("mae")).eval()
    model.save_pretrained(tmp_path)
    loaded = ArlowMAEForPreTraining.from_pretrained(tmp_path).eval()
    pv, grid = batch()
    noise = torch.rand(int(windows_per_slice(grid, 2).sum()))
    assert torch.equal(model(pv, grid, noise=noise).pred, loaded(pv, grid, noise=noise).pred)


def test_flops_scale_with_visible_fraction(tiny_config):
    cfg = tiny_config("mae")
    grid = torch.tensor([[1, 16, 16]])
    low, high = mae_train_flops(cfg, grid, 0.9), mae_train_flops(cfg, grid, 0.5)
    assert 0 < low < high
    assert mae_train_flops(cfg, torch.tensor([[1, 16, 16], [1, 16, 16]])) == pytest.approx(2 * mae_train_flops(cfg, grid))


def test_bad_input(tiny_config):
    model = ArlowMAEForPreTraining(tiny_config("mae"))
    with pytest.raises(ValueError, match="pixel_values must be"):
        model(torch.zeros(16, 10), torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match="must be an even integer"):
        tiny_config("mae", decoder_num_heads=3)


def test_decoder_rotary_stays_fp32_under_bf16_cast(tiny_config):
    torch.manual_seed(0)
    model = ArlowMAEForPreTraining(tiny_config("mae", decoder_hidden_size=64, decoder_num_heads=2))
    grid = torch.tensor([[2, 16, 24]])  # windows up to (1, 7, 11): angles large enough for rounding to show
    before = model.decoder_rotary(grid)
    model.to(torch.bfloat16)
    cos, sin = model.decoder_rotary(grid)
    assert cos.dtype == sin.dtype == torch.float32
    assert torch.equal(cos, before[0]) and torch.equal(sin, before[1])
    # Independent float64 table: slot j turns with axis slot_axes[j] at theta ** (-2j / D).
    head_dim = 32
    pos = window_positions(grid, 2).double()
    axes = mrope_slot_axes(default_mrope_sections(head_dim))
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = pos[:, axes] * inv_freq
    ref_cos, ref_sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    assert (cos.double() - ref_cos).abs().max() < 1e-5 and (sin.double() - ref_sin).abs().max() < 1e-5
    # What a bf16-cast frequency buffer gave: errors two orders of magnitude larger.
    rounded = pos[:, axes] * inv_freq.to(torch.bfloat16).double()
    assert (rounded.cos() - angles.cos()).abs().max() > 1e-3
    # The decoder's rotation of bf16 queries: the fp32 rotation rounded once to bf16.
    q = torch.randn(1, 2, pos.shape[0], head_dim).to(torch.bfloat16)
    got = apply_rotary(q, cos[None, None], sin[None, None])
    half = q.double()[..., head_dim // 2:], q.double()[..., :head_dim // 2]
    exact = q.double() * ref_cos + torch.cat([-half[0], half[1]], -1) * ref_sin
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.double(), exact, rtol=2**-8, atol=1e-6)


def test_deepstack_dropout_trains_every_parameter_and_evaluation_reads_every_level(tiny_config):
    pv, grid = batch()
    noise = torch.rand(int(windows_per_slice(grid, 2).sum()), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    half = ArlowMAEForPreTraining(tiny_config("mae", decoder_deepstack_dropout=0.5))
    plain = ArlowMAEForPreTraining(tiny_config("mae"))
    plain.load_state_dict(half.state_dict())
    # evaluation: no window is dropped, so the prediction is the p = 0 model's
    half.eval(), plain.eval()
    torch.testing.assert_close(half(pv, grid, noise=noise).pred, plain(pv, grid, noise=noise).pred)
    # training: some windows read the final token alone; every parameter still gets gradient
    half.train()
    torch.manual_seed(3)
    for _ in range(4):  # a few visible windows each: over four draws some keep their levels, some do not
        half(pv, grid, noise=noise).loss.backward()
    assert [n for n, p in half.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []
    # p = 1: the decoder never reads the levels, so their projections and mergers get no gradient
    never = ArlowMAEForPreTraining(tiny_config("mae", decoder_deepstack_dropout=1.0)).train()
    never(pv, grid, noise=noise).loss.backward()
    idle = {n.split(".")[0] + "." + n.split(".")[1] for n, p in never.named_parameters() if p.grad is None}
    assert idle == {"decoder_deepstack_embed.0", "decoder_deepstack_embed.1", "decoder_deepstack_embed.2",
                    "encoder.deepstack_mergers"}
    with pytest.raises(ValueError, match="decoder_deepstack_dropout"):
        tiny_config("mae", decoder_deepstack_dropout=1.5)
