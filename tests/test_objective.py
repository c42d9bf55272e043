"""The masked-diffusion objective: noise schedule, masking transition, loss value, gradient flow."""

import math

import pytest
import torch
from conftest import xla_sync

from model import (DiffusionConfig, Qwen3Config, Qwen3ForDiffusionLM, diffusion_loss, draw_noise,
                   maskable_positions, noise_batch)

MASK = 96
CFG = Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=10000.0)


def _batch():
    """Two packed rows: row 0 = SFT example (3 prompt + 4 response) + pretraining example (4)
    + 1 padding; row 1 = one example (2 prompt + 6 response) + 4 padding."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, MASK, (2, 12), generator=g)
    seg = torch.tensor([[1] * 7 + [2] * 4 + [0], [1] * 8 + [0] * 4], dtype=torch.int32)
    pos = torch.tensor([list(range(7)) + list(range(4)) + [0], list(range(8)) + [0] * 4],
                       dtype=torch.int32)
    src = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1], [1, 1, 0, 0, 0, 0, 0, 0] + [1] * 4],
                       dtype=torch.bool)
    ids[seg == 0] = 0  # padding token (eos in real data)
    return {"input_ids": ids.to(torch.int32), "src_mask": src, "segment_ids": seg,
            "position_ids": pos}


def _model(**kw):
    torch.manual_seed(0)
    return Qwen3ForDiffusionLM(CFG, attention_kernel="naive", loss_kernel="naive", **kw)


# ---- noise ---------------------------------------------------------------------------------------


def test_draw_noise_is_reproducible_and_in_range():
    t1, u1 = draw_noise(64, 16, torch.Generator().manual_seed(5), sampling_eps=0.1)
    t2, u2 = draw_noise(64, 16, torch.Generator().manual_seed(5), sampling_eps=0.1)
    assert torch.equal(t1, t2) and torch.equal(u1, u2)
    assert t1.dtype == u1.dtype == torch.float32 and t1.shape == (64,) and u1.shape == (64, 16)
    assert t1.min() >= 0.1 and t1.max() < 1.0 and u1.min() >= 0 and u1.max() < 1
    t3, _ = draw_noise(64, 16, torch.Generator().manual_seed(6), sampling_eps=0.1)
    assert not torch.equal(t1, t3)


def test_antithetic_noise_is_stratified():
    b, eps = 8, 1e-3
    t, _ = draw_noise(b, 4, torch.Generator().manual_seed(7), sampling_eps=eps, antithetic=True)
    frac = ((t - eps) / (1 - eps)).sort().values
    # exactly one draw per stratum [i/B, (i+1)/B)
    assert torch.equal(torch.floor(frac * b + 1e-6).long(), torch.arange(b))
    gaps = frac[1:] - frac[:-1]
    torch.testing.assert_close(gaps, torch.full_like(gaps, 1 / b), atol=1e-5, rtol=0)


def test_full_mask_masks_every_maskable_token_and_keeps_later_draws():
    """full_mask (the first diffusion.full_mask_steps steps): t = 1, so every maskable token is
    masked and weighted 1; u and the generator's state are what an ordinary draw leaves."""
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    t_plain, u_plain = draw_noise(8, 12, g1, sampling_eps=1e-3, antithetic=True)
    t_full, u_full = draw_noise(8, 12, g2, sampling_eps=1e-3, antithetic=True, full_mask=True)
    assert torch.equal(t_full, torch.ones(8)) and torch.equal(u_full, u_plain)
    assert t_plain.max() < 1.0
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))
    batch = _batch()
    maskable = maskable_positions(batch, True)
    _, loss_mask = noise_batch(batch["input_ids"], maskable, t_full[:2], u_full[:2], MASK)
    assert torch.equal(loss_mask, maskable)
    with pytest.raises(ValueError, match="full_mask_steps must be a non-negative int"):
        DiffusionConfig(mask_token_id=MASK, full_mask_steps=-1)


def test_mask_rate_tracks_t():
    """Per row, the masked fraction of maskable tokens ~ Binomial(n, t)/n. With n = 40,000 the
    standard deviation is <= 0.0025; the tolerance is 8 of them (and the generator is seeded)."""
    t = torch.tensor([0.001, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999])
    n = 40_000
    _, u = draw_noise(len(t), n, torch.Generator().manual_seed(8))
    ids = torch.ones(len(t), n, dtype=torch.int32)
    maskable = torch.ones(len(t), n, dtype=torch.bool)
    maskable[:, ::2] = False  # half the positions are prompt: the rate is over maskable ones
    noisy, loss_mask = noise_batch(ids, maskable, t, u, MASK)
    rate = loss_mask.sum(1).float() / maskable.sum(1).float()
    sd = torch.sqrt(t * (1 - t) / (n // 2))
    assert torch.all((rate - t).abs() <= 8 * sd + 1e-4), (rate, t)
    assert torch.equal(noisy == MASK, loss_mask)
    assert not loss_mask[~maskable].any()


@pytest.mark.parametrize("shift", [True, False])
def test_prompt_and_padding_never_noised_or_counted(shift):
    batch = _batch()
    maskable = maskable_positions(batch, shift)
    expected = (~batch["src_mask"]) & (batch["segment_ids"] > 0)
    if shift:  # a segment's first token has no in-segment predictor
        expected &= batch["position_ids"] != 0
    assert torch.equal(maskable, expected)
    assert maskable[0, 7] == (not shift)  # first token of row 0's second (pretraining) example
    t = torch.ones(2)  # t = 1: every maskable token is masked
    u = torch.rand(2, 12, generator=torch.Generator().manual_seed(9))
    noisy, loss_mask = noise_batch(batch["input_ids"], maskable, t, u, MASK)
    assert torch.equal(loss_mask, maskable)
    assert torch.equal(noisy[~maskable], batch["input_ids"][~maskable])
    _, stats = diffusion_loss(_model(), batch, t, u, DiffusionConfig(MASK, shift_logits=shift))
    assert stats["num_loss_positions"].item() == maskable.sum().item()
    assert stats["num_maskable"].item() == maskable.sum().item()
    assert stats["num_tokens"].item() == 11 + 8


# ---- loss value ----------------------------------------------------------------------------------


def _hand_loss(model, batch, t, u, shift, norm):
    """The objective written out from full logits, position by position."""
    maskable = (~batch["src_mask"]) & (batch["segment_ids"] > 0)
    if shift:
        maskable &= batch["position_ids"] != 0
    ids = batch["input_ids"].long()
    masked = maskable & (u < t[:, None])
    noisy = torch.where(masked, torch.full_like(ids, MASK), ids)
    with torch.no_grad():
        logp = torch.log_softmax(
            model.logits(model(noisy, batch["segment_ids"], batch["position_ids"])).double(), -1)
    total = 0.0
    b, l = ids.shape
    for r in range(b):
        for i in range(l):
            if masked[r, i]:
                src = i - 1 if shift else i
                total += -logp[r, src, ids[r, i]].item() / t[r].item()
    denom = {"maskable": max(int(maskable.sum()), 1), "batch": b * l,
             "masked": max(int(masked.sum()), 1)}[norm]
    return total / denom, int(masked.sum())


@pytest.mark.parametrize("shift", [True, False], ids=["shift", "noshift"])
@pytest.mark.parametrize("norm", ["maskable", "batch", "masked"])
def test_loss_equals_hand_computation(norm, shift):
    batch = _batch()
    model = _model()
    t = torch.tensor([0.6, 0.35])
    u = torch.rand(2, 12, generator=torch.Generator().manual_seed(10))
    want, n_masked = _hand_loss(model, batch, t, u, shift, norm)
    assert n_masked >= 3  # the fixed case really has loss positions
    loss, stats = diffusion_loss(model, batch, t, u,
                                 DiffusionConfig(MASK, loss_norm=norm, shift_logits=shift))
    assert math.isclose(loss.item(), want, rel_tol=1e-5)
    assert stats["num_loss_positions"].item() == n_masked
    assert math.isclose(stats["loss_sum"].item() / stats["normaliser"].item(), want, rel_tol=1e-5)


def test_no_loss_positions_gives_zero_loss_and_grads():
    batch = _batch()
    model = _model()
    t = torch.full((2,), 1e-3)
    u = torch.ones(2, 12) * 0.5  # u >= t everywhere: nothing masked
    loss, stats = diffusion_loss(model, batch, t, u, DiffusionConfig(MASK))
    loss.backward()
    assert loss.item() == 0.0 and stats["num_loss_positions"].item() == 0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


# ---- gradient flow -------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [True, False], ids=["shift", "noshift"])
def test_gradient_reaches_hidden_only_at_rows_that_predict_loss_positions(shift):
    batch = _batch()
    model = _model()
    captured = {}

    def keep(_module, _inputs, out):
        out.retain_grad()
        captured["hidden"] = out

    model.model.norm.register_forward_hook(keep)
    t = torch.tensor([0.7, 0.5])
    u = torch.rand(2, 12, generator=torch.Generator().manual_seed(11))
    loss, _ = diffusion_loss(model, batch, t, u, DiffusionConfig(MASK, shift_logits=shift))
    loss.backward()
    grad_rows = captured["hidden"].grad.abs().sum(-1) > 0  # [B, L]
    loss_mask = maskable_positions(batch, shift) & (u < t[:, None])
    expected = torch.zeros_like(loss_mask)
    if shift:
        expected[:, :-1] = loss_mask[:, 1:]
    else:
        expected = loss_mask
    assert expected.any()
    assert torch.equal(grad_rows, expected)


def test_targets_only_matter_at_loss_positions():
    """Changing a padding token changes nothing (never attended, never scored); changing the
    clean token under a MASK leaves the model input unchanged but changes the loss."""
    batch = _batch()
    model = _model()
    cfg = DiffusionConfig(MASK)
    t = torch.tensor([0.7, 0.5])
    u = torch.rand(2, 12, generator=torch.Generator().manual_seed(12))
    base, _ = diffusion_loss(model, batch, t, u, cfg)

    padded = {**batch, "input_ids": batch["input_ids"].clone()}
    padded["input_ids"][1, 9] = 42
    padded["input_ids"][0, 11] = 17
    same, _ = diffusion_loss(model, padded, t, u, cfg)
    assert same.item() == base.item()

    loss_mask = maskable_positions(batch, True) & (u < t[:, None])
    r, i = [int(x) for x in loss_mask.nonzero()[0]]
    target = {**batch, "input_ids": batch["input_ids"].clone()}
    target["input_ids"][r, i] = (target["input_ids"][r, i] + 1) % MASK
    other, _ = diffusion_loss(model, target, t, u, cfg)
    assert abs(other.item() - base.item()) > 1e-4


# ---- through torch_xla with the reference kernels -----------------------------------------------


def test_reference_backend_on_xla_matches_naive_on_cpu(xla_device):
    batch = _batch()
    t = torch.tensor([0.6, 0.35])
    u = torch.rand(2, 12, generator=torch.Generator().manual_seed(13))
    cfg = DiffusionConfig(MASK)

    cpu = _model()
    loss_cpu, stats_cpu = diffusion_loss(cpu, batch, t, u, cfg)
    loss_cpu.backward()

    xla = Qwen3ForDiffusionLM(CFG, attention_kernel="reference", loss_kernel="reference")
    xla.load_state_dict(cpu.state_dict())
    xla.to(xla_device)
    dev_batch = {k: v.to(xla_device) for k, v in batch.items()}
    loss_x, stats_x = diffusion_loss(xla, dev_batch, t, u, cfg)
    loss_x.backward()
    xla_sync()  # one graph for loss, stats and all grads; reads below are then plain transfers
    assert math.isclose(loss_x.item(), loss_cpu.item(), rel_tol=1e-5)
    for key in ("num_loss_positions", "num_maskable", "num_tokens"):
        assert stats_x[key].item() == stats_cpu[key].item()
    grads_x = dict(xla.named_parameters())
    for name, p in cpu.named_parameters():
        torch.testing.assert_close(grads_x[name].grad.cpu(), p.grad, atol=2e-5, rtol=1e-4,
                                   msg=name)
