"""Masking schedules: prefix, truncate and span masking, each switched on per row or example with a
probability that is constant or ramps linearly over the optimizer steps (the seed's "masking scheduler").

They change *which* positions the objective (DESIGN.md section 1) may noise and how the masked set is
laid out, never the objective itself, and they act only on host data before it reaches the device:

- **prefix**: each packed example, with probability p, has a random-length prefix of its maskable
  positions turned into clean context (`src_mask` = True there), as a prompt is. The model learns to
  continue a partly given answer or document. At least one maskable position is left.
- **truncate**: each row, with probability p, is cut at a random point inside its real (non-padding)
  tokens; everything from the cut on becomes padding (`segment_ids` 0, `position_ids` 0, `src_mask`
  True, and `pad_id` as the token when given): never attended to, never a loss position, not counted
  by the `maskable` normaliser. The example that straddles the cut simply ends there.
- **span**: each row, with probability p, draws its masked set as contiguous spans rather than token by
  token. A span length k is chosen per row (uniformly from the lengths of the current phase); every run
  of maskable positions of one example is tiled into length-k tiles starting at a random phase, and each
  tile is masked as a whole. This is done by giving every position of a tile the uniform `u` of the
  tile's first position, so the device's unchanged rule `masked = maskable & (u < t)` masks the tile
  iff that one uniform is below t.

How the weighting stays honest: a copied `u` is still a U(0, 1) draw, so every maskable position is
masked with probability exactly t (whatever k, the phase, or a tile cut short at the edge of a run), and
the expected masked fraction of a row is exactly t. The 1/t weight then gives each position expected
weight 1, as under i.i.d. masking, so the loss keeps its scale and stays comparable with unmasked rows.
Within a row the masked positions are correlated, so a span row estimates a span-corruption denoising
loss (the positions a model must fill come in runs), not the ELBO of the i.i.d. forward process; prefix
and truncate rows estimate the ELBO of the remaining maskable tokens given the clean prefix / of the
shortened row, and the `maskable` normaliser counts exactly those tokens.

Randomness: drawn from the per-step host generator the trainer seeds from (seed, step), *after* draw_noise
has drawn t and u, so t and the underlying uniforms are the same whether or not masking is on, and a
resumed run replays every mask. When every schedule is off nothing is drawn and nothing is touched. The
draws have fixed shapes (they do not depend on the data or the ramp), and everything changed is data
(batch arrays and u), so the compiled step graph is the same with masking on or off.

Works for any objective that builds its masks from the batch contract and a uniform per position (the
global objective here, a block-wise one later): the functions below take arrays and return arrays.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np
import torch

KINDS = ("prefix", "truncate", "span")


@dataclass(frozen=True)
class Ramp:
    """A probability that is constant, or moves linearly from `ramp_from` at step 0 to `probability` at
    step `ramp_steps` and stays there (the seed's linear schedule is ramp_from = 0).

    probability: the value from step `ramp_steps` on (with ramp_steps = 0: at every step).
    ramp_from: the value at step 0 (only used when ramp_steps > 0).
    ramp_steps: length of the linear ramp in optimizer steps; 0 = constant.
    """

    probability: float = 0.0
    ramp_from: float = 0.0
    ramp_steps: int = 0

    def __post_init__(self):
        for name in ("probability", "ramp_from"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
                raise ValueError(f"masking: {name} must be a number in [0, 1], got {value!r}")
        if (isinstance(self.ramp_steps, bool) or not isinstance(self.ramp_steps, numbers.Integral)
                or self.ramp_steps < 0):
            raise ValueError(f"masking: ramp_steps must be a non-negative int, got {self.ramp_steps!r}")

    def at(self, step: int) -> float:
        if self.ramp_steps <= 0 or step >= self.ramp_steps:
            return float(self.probability)
        return float(self.ramp_from + (self.probability - self.ramp_from) * max(step, 0) / self.ramp_steps)

    @property
    def active(self) -> bool:
        """Whether the probability is above 0 at some step."""
        return self.probability > 0 or (self.ramp_steps > 0 and self.ramp_from > 0)


@dataclass(frozen=True)
class MaskingConfig:
    """prefix, truncate, span: the three schedules (see the module docstring).
    span_lengths: phases of span lengths. One phase = the same lengths throughout; several = the run's
        `total_steps` split into equal phases, phase i using span_lengths[i] (the seed's list of lists,
        e.g. ((2,), (2, 4), (2, 4, 8)) grows the spans over training).
    total_steps: the run's max_steps, which places the phase boundaries.
    """

    prefix: Ramp = field(default_factory=Ramp)
    truncate: Ramp = field(default_factory=Ramp)
    span: Ramp = field(default_factory=Ramp)
    span_lengths: tuple[tuple[int, ...], ...] = ((2, 4, 8),)
    total_steps: int = 0

    def __post_init__(self):
        phases = self.span_lengths
        ok = isinstance(phases, tuple) and len(phases) > 0 and all(
            isinstance(p, tuple) and len(p) > 0 and all(
                isinstance(k, numbers.Integral) and not isinstance(k, bool) and k > 0 for k in p)
            for p in phases)
        if not ok:
            raise ValueError(f"masking: span_lengths must be non-empty phases of positive ints, got {phases!r}")

    @property
    def enabled(self) -> bool:
        return self.prefix.active or self.truncate.active or self.span.active

    def probabilities(self, step: int) -> dict[str, float]:
        return {kind: getattr(self, kind).at(step) for kind in KINDS}

    def span_lengths_at(self, step: int) -> tuple[int, ...]:
        """The lengths of the phase `step` falls in: phase i covers steps [int(T*i/n), int(T*(i+1)/n))
        of T = total_steps split into n equal phases; steps past T use the last phase."""
        n = len(self.span_lengths)
        for i in range(n - 1):
            if step < int(self.total_steps * (i + 1) / n):
                return self.span_lengths[i]
        return self.span_lengths[-1]

    @classmethod
    def from_config(cls, node, total_steps: int) -> "MaskingConfig | None":
        """From `diffusion.masking` (a mapping; missing keys take the defaults). None when every
        schedule is off, so the trainer takes exactly the path it takes without this feature."""
        if node is None:
            return None

        def ramp(kind):
            sub = node.get(kind) or {}
            return Ramp(probability=sub.get("probability", 0.0), ramp_from=sub.get("ramp_from", 0.0),
                        ramp_steps=sub.get("ramp_steps", 0))

        lengths = (node.get("span") or {}).get("lengths", [2, 4, 8])
        lengths = list(lengths) if lengths is not None else []
        if lengths and all(isinstance(k, numbers.Integral) for k in lengths):
            phases = (tuple(lengths),)
        else:
            phases = tuple(tuple(p) if not isinstance(p, (str, bytes)) and hasattr(p, "__iter__") else p
                           for p in lengths)
        made = cls(prefix=ramp("prefix"), truncate=ramp("truncate"), span=ramp("span"), span_lengths=phases,
                   total_steps=int(total_steps))
        return made if made.enabled else None


# ---- the three transforms, on arrays ----------------------------------------------------------------


def _int_below(uniform: np.ndarray, n: np.ndarray) -> np.ndarray:
    """floor(uniform * n) kept in [0, n - 1] (uniform in [0, 1), n >= 1)."""
    return np.minimum(np.floor(uniform * n).astype(np.int64), np.maximum(n - 1, 0))


def truncate_cuts(segment_ids: np.ndarray, coin: np.ndarray, where: np.ndarray, probability: float) -> np.ndarray:
    """[B] int: the column each row is cut at (L = not cut). A row is cut with probability `probability`
    (coin < p) when it has at least 2 real tokens, at 1 + floor(where * (n - 1)) for n = 1 + the index of
    its last real token, so the cut keeps at least one token and lands inside the real part."""
    b, l = segment_ids.shape
    real = segment_ids > 0
    n = np.where(real.any(1), l - np.argmax(real[:, ::-1], axis=1), 0)
    cut = 1 + _int_below(where, np.maximum(n - 1, 1))
    return np.where((coin < probability) & (n >= 2), cut, l).astype(np.int64)


def apply_truncation(batch: dict[str, np.ndarray], cuts: np.ndarray, pad_id: int | None = None) -> dict:
    """A copy of `batch` with every column >= cuts[row] made padding (segment 0, position 0, src_mask
    True, input id `pad_id` when given)."""
    out = {k: np.array(v, copy=True) for k, v in batch.items()}
    tail = np.arange(out["segment_ids"].shape[1])[None, :] >= cuts[:, None]
    out["segment_ids"][tail] = 0
    out["position_ids"][tail] = 0
    out["src_mask"][tail] = True
    if pad_id is not None:
        out["input_ids"][tail] = pad_id
    return out


def _segment_starts(segment_ids: np.ndarray) -> np.ndarray:
    """[B, L] int: for each position, the column where its packed example begins."""
    b, l = segment_ids.shape
    col = np.broadcast_to(np.arange(l), (b, l))
    prev = np.concatenate([np.full((b, 1), -1, dtype=segment_ids.dtype), segment_ids[:, :-1]], axis=1)
    start = (segment_ids != prev)
    return np.maximum.accumulate(np.where(start, col, 0), axis=1)


def prefix_clean(maskable: np.ndarray, segment_ids: np.ndarray, coin: np.ndarray, length: np.ndarray,
                 probability: float) -> np.ndarray:
    """[B, L] bool: positions to turn into clean context. Each packed example whose first column c has
    coin[row, c] < p and n >= 2 maskable positions gets its first k = 1 + floor(length[row, c] * (n - 1))
    maskable positions (in order) made clean: 1 <= k <= n - 1, so at least one stays maskable."""
    b, l = maskable.shape
    starts = _segment_starts(segment_ids)
    rows = np.arange(b)[:, None]
    m = maskable.astype(np.int64)
    before = np.cumsum(m, axis=1) - m                   # maskable positions strictly before each column
    rank = before - before[rows, starts]                # ... within the same example
    # maskable positions per example: bincount over (row, segment) labels
    labels = rows * (l + 1) + np.where(segment_ids > 0, segment_ids, 0)
    counts = np.bincount(labels.ravel(), weights=m.ravel(), minlength=b * (l + 1)).astype(np.int64)
    n = counts[labels]
    chosen = coin[rows, starts] < probability
    k = 1 + _int_below(length[rows, starts], np.maximum(n - 1, 1))
    return maskable & (segment_ids > 0) & chosen & (n >= 2) & (rank < k)


def span_uniforms(u: torch.Tensor, maskable: np.ndarray, segment_ids: np.ndarray, coin: np.ndarray,
                  pick: np.ndarray, phase: np.ndarray, probability: float, lengths: tuple[int, ...]) -> torch.Tensor:
    """u [B, L] with span rows' uniforms made constant on tiles (see the module docstring): a row with
    coin < p takes span length k = lengths[floor(pick * len(lengths))]; each run of maskable positions
    within one example, starting at column r, is tiled from phase floor(phase[row, r] * k), and every
    position takes the uniform of its tile's first position. Other rows and positions keep their u.

    Every position's new uniform is one of the original i.i.d. U(0, 1) draws, so P(masked) = t exactly
    at every maskable position and the expected masked fraction of the row is t."""
    b, l = maskable.shape
    out = u.clone()
    src = u.detach().cpu().numpy()
    lens = np.asarray(lengths, dtype=np.int64)
    k_all = lens[_int_below(pick, np.full(b, len(lens)))]
    rows = np.nonzero((coin < probability) & (k_all > 1))[0]
    if rows.size == 0:
        return out
    mask = maskable[rows].astype(bool)
    seg = segment_ids[rows]
    col = np.broadcast_to(np.arange(l), mask.shape)
    prev_mask = np.concatenate([np.zeros((len(rows), 1), bool), mask[:, :-1]], axis=1)
    prev_seg = np.concatenate([np.full((len(rows), 1), -1, seg.dtype), seg[:, :-1]], axis=1)
    run_start = mask & (~prev_mask | (seg != prev_seg))
    r = np.maximum.accumulate(np.where(run_start, col, 0), axis=1)   # start column of each position's run
    k = k_all[rows][:, None]
    sub = np.arange(len(rows))[:, None]
    offset = (col - r + _int_below(phase[rows][sub, r], np.broadcast_to(k, r.shape))) % k
    tile_start = np.maximum(r, col - offset)
    new = np.where(mask, src[rows][sub, tile_start], src[rows])
    out[torch.from_numpy(rows)] = torch.from_numpy(new).to(out.dtype)
    return out


# ---- one step's batches -----------------------------------------------------------------------------


def apply_masking(batch: dict[str, np.ndarray], u: torch.Tensor, generator: torch.Generator, step: int,
                  cfg: MaskingConfig | None, *, shift_logits: bool,
                  pad_id: int | None = None) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """(batch, u) after truncate, then prefix, then span masking at optimizer step `step`.

    batch: the data contract's host arrays [B, L]; u [B, L] from draw_noise (rows in the same order).
    Draws from `generator` (fixed shapes: 4 x [B] and 3 x [B, L] float64) only when cfg is enabled;
    with cfg None or disabled the inputs come back as they are and the generator is not touched."""
    if cfg is None or not cfg.enabled:
        return batch, u
    from model.diffusion import maskable_positions

    b, l = np.asarray(batch["segment_ids"]).shape

    def draw(*shape):
        return torch.rand(shape, generator=generator, dtype=torch.float64).numpy()

    trunc_coin, trunc_at = draw(b), draw(b)
    prefix_coin, prefix_len = draw(b, l), draw(b, l)
    span_coin, span_pick, span_phase = draw(b), draw(b), draw(b, l)
    p = cfg.probabilities(step)

    out = apply_truncation(batch, truncate_cuts(np.asarray(batch["segment_ids"]), trunc_coin, trunc_at,
                                                p["truncate"]), pad_id)

    def maskable_of(arrays):
        return maskable_positions({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()},
                                  shift_logits).numpy()

    clean = prefix_clean(maskable_of(out), out["segment_ids"], prefix_coin, prefix_len, p["prefix"])
    out["src_mask"] = out["src_mask"] | clean
    u = span_uniforms(u, maskable_of(out), out["segment_ids"], span_coin, span_pick, span_phase, p["span"],
                      cfg.span_lengths_at(step))
    return out, u


def apply_masking_to_step(batches: list[dict[str, np.ndarray]], u_all: torch.Tensor, generator: torch.Generator,
                          step: int, cfg: MaskingConfig | None, *, shift_logits: bool,
                          pad_id: int | None = None) -> tuple[list[dict[str, np.ndarray]], torch.Tensor]:
    """apply_masking over a step's micro-batches taken as one batch (rows in order, as u_all's), so
    k accumulated micro-batches get the same masks as one batch k times larger."""
    if cfg is None or not cfg.enabled:
        return batches, u_all
    whole = {k: np.concatenate([np.asarray(mb[k]) for mb in batches], axis=0) for k in batches[0]}
    whole, u_all = apply_masking(whole, u_all, generator, step, cfg, shift_logits=shift_logits, pad_id=pad_id)
    bounds = np.cumsum([0] + [len(mb["segment_ids"]) for mb in batches])
    return [{k: v[bounds[i]:bounds[i + 1]] for k, v in whole.items()} for i in range(len(batches))], u_all
