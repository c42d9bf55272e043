"""The masked-diffusion objective (DESIGN.md section 1).

Per sequence: t ~ U(eps, 1); each maskable token is replaced by MASK with probability t; the model
sees the noisy sequence with bidirectional, segment-restricted attention; the loss is
sum over masked positions of (1/t) * CE(prediction, clean token), divided by a normaliser.

Randomness is drawn on the host from a torch.Generator the caller seeds (the trainer derives it
from (seed, step, micro-step)), so a resumed run replays the same noise; the device only applies it.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

import kernels

if TYPE_CHECKING:
    from model.masking import MaskingConfig

LOSS_NORMS = ("maskable", "batch", "masked")
OBJECTIVES = ("mdlm", "bd3lm")


@dataclass(frozen=True)
class DiffusionConfig:
    """mask_token_id: id written at noised positions (151669 = <|mask|> for Qwen3).
    sampling_eps: t ~ U(eps, 1), keeping 1/t bounded.
    antithetic: stratified t across the batch (one uniform offset, B evenly spaced strata).
    loss_norm: maskable (number of maskable tokens; default, per-token ELBO) | batch (B*L) |
        masked (number of loss positions).
    shift_logits: hidden state i-1 predicts token i (AR-adapted convention); False: i predicts i.
    full_mask_steps: the first N optimizer steps train with t = 1 (every maskable token masked):
        each answer token must then be predicted from the prompt alone. A small model trained from
        scratch learns that routing several times faster than under t ~ U(eps, 1), where the
        revealed answer tokens offer easier cues; later steps draw t ~ U(eps, 1) as usual.
    masking: the training-time masking schedules (prefix, truncate, span; model/masking.py), applied on
        the host to each step's batch and u before the step runs; None = off (the default).
    objective: mdlm (one noised copy, bidirectional attention: the global masked objective) | bd3lm
        (block diffusion, Arriola et al. 2025: the noised copy and the clean copy in one forward; a
        noised block sees itself and the clean blocks before it, so decoding goes block by block over
        an exact key/value cache). See `block_diffusion_inputs`.
    block_size: bd3lm's block length in tokens (blocks start at position 0 of every example).
    """

    mask_token_id: int
    sampling_eps: float = 1e-3
    antithetic: bool = False
    loss_norm: str = "maskable"
    shift_logits: bool = True
    full_mask_steps: int = 0
    masking: "MaskingConfig | None" = None  # model.masking.MaskingConfig
    objective: str = "mdlm"
    block_size: int = 8

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"diffusion: objective={self.objective!r} is unknown; allowed: {', '.join(OBJECTIVES)}")
        if (not isinstance(self.block_size, numbers.Integral) or isinstance(self.block_size, bool)
                or self.block_size < 1):
            raise ValueError(f"diffusion: block_size must be a positive int, got {self.block_size!r}")
        if self.loss_norm not in LOSS_NORMS:
            raise ValueError(f"diffusion: loss_norm={self.loss_norm!r} is unknown; allowed: "
                             f"{', '.join(LOSS_NORMS)}")
        if (not isinstance(self.full_mask_steps, numbers.Integral) or isinstance(self.full_mask_steps, bool)
                or self.full_mask_steps < 0):
            raise ValueError(f"diffusion: full_mask_steps must be a non-negative int, "
                             f"got {self.full_mask_steps!r}")
        if not 0.0 <= self.sampling_eps < 1.0:
            raise ValueError(f"diffusion: sampling_eps must be in [0, 1), got {self.sampling_eps}")
        if (not isinstance(self.mask_token_id, numbers.Integral)
                or isinstance(self.mask_token_id, bool) or self.mask_token_id < 0):
            raise ValueError(f"diffusion: mask_token_id must be a non-negative int, "
                             f"got {self.mask_token_id!r}")


def draw_noise(batch_size: int, seq_len: int, generator: torch.Generator, *,
               sampling_eps: float = 1e-3, antithetic: bool = False, full_mask: bool = False):
    """(t [B] fp32 in [eps, 1), u [B, L] fp32 in [0, 1)) on the CPU.

    antithetic: t_i = eps + (1 - eps) * ((u0 + i / B) mod 1) with one u0 per batch, so every
    batch covers the noise levels evenly (lower-variance loss estimate, same marginal law).
    full_mask: t = 1 for every row (every maskable token masked, weight 1); the same draws are
    consumed, so the noise of later steps does not depend on it.
    """
    if antithetic:
        u0 = torch.rand((), generator=generator, dtype=torch.float32)
        frac = torch.remainder(u0 + torch.arange(batch_size, dtype=torch.float32) / batch_size, 1.0)
    else:
        frac = torch.rand((batch_size,), generator=generator, dtype=torch.float32)
    t = sampling_eps + (1.0 - sampling_eps) * frac
    u = torch.rand((batch_size, seq_len), generator=generator, dtype=torch.float32)
    if full_mask:
        t = torch.ones_like(t)
    return t, u


def noise_batch(input_ids: torch.Tensor, maskable: torch.Tensor, t: torch.Tensor,
                u: torch.Tensor, mask_token_id: int):
    """(noisy_ids, loss_mask): a maskable position is masked iff u < t of its row."""
    loss_mask = maskable & (u < t[:, None])
    noisy = torch.where(loss_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    return noisy, loss_mask


def maskable_positions(batch: dict, shift_logits: bool) -> torch.Tensor:
    """[B, L] bool: positions that may be noised and scored.

    Not maskable: prompt tokens and padding (src_mask), padding again via segment 0 and, with
    shift_logits, the first token of every packed segment (position_ids == 0) and of every row:
    its predictor would be the previous segment's last token, which it cannot attend to.
    """
    segment_ids = batch["segment_ids"]
    maskable = (~batch["src_mask"].bool()) & (segment_ids > 0)
    if shift_logits:
        not_first = torch.arange(maskable.shape[1], device=maskable.device) > 0
        maskable = maskable & (batch["position_ids"] != 0) & not_first[None, :]
    return maskable


def loss_targets(input_ids: torch.Tensor, loss_mask: torch.Tensor, t: torch.Tensor, shift_logits: bool):
    """(targets, token_weight) [B, L]: the token each position's hidden state predicts and its loss
    weight, 1/t of its row at loss positions, 0 elsewhere."""
    b, l = input_ids.shape
    token_weight = torch.where(loss_mask, (1.0 / t)[:, None].expand(b, l),
                               torch.zeros((), dtype=torch.float32, device=input_ids.device))
    if not shift_logits:
        return input_ids, token_weight
    # Row i predicts token i+1: shift targets and weights left instead of slicing hidden, so the
    # kernel sees N = B*L rows (block-friendly) and no copy of hidden is made. The last column gets a
    # dummy target with weight 0 (position 0 is never a loss position).
    targets = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)
    token_weight = torch.cat([token_weight[:, 1:], torch.zeros_like(token_weight[:, :1])], dim=1)
    return targets, token_weight


def loss_normaliser(loss_norm: str, maskable: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """What the weighted CE sum is divided by (fp32 scalar): maskable positions, loss positions, or
    every slot of the [B, L] batch."""
    if loss_norm == "maskable":
        return maskable.sum().clamp(min=1).float()
    if loss_norm == "masked":
        return loss_mask.sum().clamp(min=1).float()
    return torch.full((), float(loss_mask.numel()), dtype=torch.float32, device=loss_mask.device)


def block_ids(segment_ids: torch.Tensor, position_ids: torch.Tensor, *, block_size: int, shift: bool,
              clean: bool) -> torch.Tensor:
    """[B, L] int32 block-diffusion attention ids (kernels/__init__.py) of one copy of a batch:
    (segment << BD_CODE_BITS) | (2 * block + clean), 0 on padding. A position's block is the block of
    the token its hidden state predicts: (position + shift) // block_size."""
    seg = segment_ids.to(torch.int32)
    block = torch.div(position_ids.to(torch.int32) + int(shift), block_size, rounding_mode="floor")
    code = 2 * block + int(clean)
    ids = seg * (1 << kernels.BD_CODE_BITS) + code
    return torch.where(seg > 0, ids, torch.zeros_like(ids))


def block_diffusion_inputs(input_ids, noisy, segment_ids, position_ids, *, block_size: int, shift: bool):
    """The bd3lm forward's inputs [B, 2L]: the noised copy, then the clean copy, with their
    block-diffusion ids and positions (both copies keep the row's positions, so RoPE sees the same
    offsets as at decoding).

    With shift, the hidden state at i predicts token i + 1, so a noised block's queries are the
    positions [b * size - 1, (b + 1) * size - 1): the first of them holds the previous block's last
    token, which decoding has already fixed, so the noised copy shows it clean. That token is still
    scored, by its own block (its predictor, one position earlier, never sees it)."""
    pos2 = torch.cat([position_ids, position_ids], dim=1)
    noisy_in = noisy
    if shift:
        last_of_block = torch.remainder(position_ids, block_size) == block_size - 1
        noisy_in = torch.where(last_of_block, input_ids, noisy)
    ids = torch.cat([block_ids(segment_ids, position_ids, block_size=block_size, shift=shift, clean=False),
                     block_ids(segment_ids, position_ids, block_size=block_size, shift=shift, clean=True)], dim=1)
    return torch.cat([noisy_in, input_ids], dim=1), ids, pos2


def diffusion_loss(model, batch: dict, t: torch.Tensor, u: torch.Tensor, cfg: DiffusionConfig):
    """(loss, stats) for one batch of device tensors (the data contract: input_ids, src_mask,
    segment_ids, position_ids, all [B, L]). t [B], u [B, L] come from draw_noise.

    loss = sum over loss positions of (1/t) * CE / normaliser. stats are device tensors (no host
    sync): loss_sum (fp32, before normalising), num_loss_positions, num_maskable, num_tokens
    (non-padding), normaliser (fp32, what loss_sum was divided by).
    """
    input_ids = batch["input_ids"]
    device = input_ids.device
    t = t.to(device=device, dtype=torch.float32)
    u = u.to(device=device, dtype=torch.float32)
    segment_ids = batch["segment_ids"]
    position_ids = batch["position_ids"]

    maskable = maskable_positions(batch, cfg.shift_logits)
    noisy, loss_mask = noise_batch(input_ids, maskable, t, u, cfg.mask_token_id)
    if cfg.objective == "bd3lm":
        if not getattr(model, "block_diffusion", False):
            raise ValueError("diffusion: the bd3lm objective needs a model built with block_diffusion=True")
        # One forward over both copies; only the noised copy's hidden states are scored.
        ids2, bd_ids, pos2 = block_diffusion_inputs(input_ids, noisy, segment_ids, position_ids,
                                                    block_size=cfg.block_size, shift=cfg.shift_logits)
        hidden = model(ids2, bd_ids, pos2)[:, :input_ids.shape[1]]
    else:
        hidden = model(noisy, segment_ids, position_ids)
    targets, token_weight = loss_targets(input_ids, loss_mask, t, cfg.shift_logits)
    h = hidden.shape[-1]
    loss_sum = kernels.masked_cross_entropy(
        hidden.reshape(-1, h), model.lm_head_weight, targets.reshape(-1).to(torch.int32),
        token_weight.reshape(-1), backend=model.loss_kernel,
        block_sizes=getattr(model, "loss_kernel_config", None))

    normaliser = loss_normaliser(cfg.loss_norm, maskable, loss_mask)
    stats = {
        "loss_sum": loss_sum.detach(),
        "num_loss_positions": loss_mask.sum(),
        "num_maskable": maskable.sum(),
        "num_tokens": (segment_ids > 0).sum(),
        "normaliser": normaliser,
    }
    return loss_sum / normaliser, stats
