"""Masking schedules (model/masking.py): ramps and span phases, what each schedule does to the batch and
u, the objective's masks and loss normaliser on the result, bit-for-bit defaults, resume determinism,
config errors, and a tiny training run with all three on."""

import math

import numpy as np
import pytest
import torch

from model import DiffusionConfig, Qwen3Config, Qwen3ForDiffusionLM, diffusion_loss, draw_noise, maskable_positions
from model.masking import (MaskingConfig, Ramp, apply_masking, apply_masking_to_step, prefix_clean,
                           span_uniforms, truncate_cuts)
from train.config import ConfigError, load_config

MASK, PAD = 96, 95
ON = MaskingConfig(prefix=Ramp(1.0), truncate=Ramp(1.0), span=Ramp(1.0), span_lengths=((3,),))


def _packed(rows: int, length: int, seed: int) -> dict[str, np.ndarray]:
    """Random packed rows of the data contract: examples of 3-20 tokens, each a prompt of 0-4 tokens then
    a response, padding after the last example that fits."""
    rng = np.random.default_rng(seed)
    batch = {"input_ids": rng.integers(0, PAD, (rows, length)).astype(np.int32),
             "src_mask": np.ones((rows, length), bool), "segment_ids": np.zeros((rows, length), np.int32),
             "position_ids": np.zeros((rows, length), np.int32)}
    for r in range(rows):
        p, k = 0, 1
        while True:
            n = int(rng.integers(3, 21))
            if p + n > length - int(rng.integers(0, 6)):
                break
            prompt = int(rng.integers(0, 5))
            batch["segment_ids"][r, p:p + n] = k
            batch["position_ids"][r, p:p + n] = np.arange(n)
            batch["src_mask"][r, p:p + n] = np.arange(n) < prompt
            p, k = p + n, k + 1
        batch["input_ids"][r, p:] = PAD
    return batch


def _maskable(batch, shift=True):
    return maskable_positions({k: torch.from_numpy(v) for k, v in batch.items()}, shift).numpy()


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- schedules over steps -----------------------------------------------------------------------------------


def test_ramps_and_span_phases_follow_the_step():
    up = Ramp(probability=0.2, ramp_steps=1000)  # the seed's linear schedule: 0 -> target, then flat
    assert [up.at(s) for s in (0, 250, 500, 1000, 2000)] == pytest.approx([0.0, 0.05, 0.1, 0.2, 0.2])
    down = Ramp(probability=0.1, ramp_from=0.5, ramp_steps=4)
    assert [down.at(s) for s in range(6)] == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.1, 0.1])
    flat = Ramp(probability=0.3, ramp_from=0.9)  # ramp_steps 0: constant, ramp_from unused
    assert flat.at(0) == flat.at(10**6) == 0.3
    assert not Ramp().active and Ramp(0.0, ramp_from=0.4, ramp_steps=5).active and not Ramp(0.0, 0.4, 0).active
    phased = MaskingConfig(span=Ramp(1.0), span_lengths=((2,), (2, 4), (2, 4, 8)), total_steps=30000)
    assert [phased.span_lengths_at(s) for s in (0, 9999, 10000, 19999, 20000, 29999, 50000)] == [
        (2,), (2,), (2, 4), (2, 4), (2, 4, 8), (2, 4, 8), (2, 4, 8)]
    assert MaskingConfig(span=Ramp(1.0), span_lengths=((4, 8),)).span_lengths_at(123) == (4, 8)


# ---- what each schedule does ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [True, False], ids=["shift", "noshift"])
def test_prefix_makes_a_leading_part_of_each_examples_maskable_tokens_clean(shift):
    batch = _packed(64, 96, seed=1)
    maskable = _maskable(batch, shift)
    b, l = maskable.shape
    assert not prefix_clean(maskable, batch["segment_ids"], np.zeros((b, l)), np.zeros((b, l)), 0.0).any()
    g = np.random.default_rng(2)
    coin, length = g.random((b, l)), g.random((b, l))
    clean = prefix_clean(maskable, batch["segment_ids"], coin, length, 0.5)
    assert not (clean & ~maskable).any()
    chosen = kept = 0
    for r in range(b):
        for s in set(batch["segment_ids"][r]) - {0}:
            cols = np.nonzero(batch["segment_ids"][r] == s)[0]
            idx = cols[maskable[r, cols]]
            gone = clean[r, idx]
            if len(idx) < 2 or coin[r, cols[0]] >= 0.5:
                assert not gone.any()
                continue
            k = int(gone.sum())
            chosen += 1
            # a prefix of the example's maskable positions, at least one left, length from its own uniform
            assert 1 <= k <= len(idx) - 1 and gone[:k].all() and not gone[k:].any()
            assert k == 1 + int(length[r, cols[0]] * (len(idx) - 1))
            kept += len(idx) - k
    assert chosen > 50 and kept > 0
    # through apply_masking: the prefix becomes src_mask, so the objective never noises it
    out, _ = apply_masking(batch, torch.rand(b, l, generator=_gen(3)), _gen(4), 0,
                           MaskingConfig(prefix=Ramp(1.0)), shift_logits=shift)
    after = _maskable(out, shift)
    assert not (after & ~maskable).any() and after.sum() < maskable.sum()
    assert np.array_equal(out["src_mask"], batch["src_mask"] | (maskable & ~after))
    for key in ("input_ids", "segment_ids", "position_ids"):
        assert np.array_equal(out[key], batch[key])


def _tiny_model():
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=10000.0)
    return Qwen3ForDiffusionLM(cfg, attention_kernel="naive", loss_kernel="naive")


def test_truncated_tail_is_padding_never_scored_and_not_counted():
    batch = _packed(6, 48, seed=5)
    b, l = batch["segment_ids"].shape
    cuts = truncate_cuts(batch["segment_ids"], np.zeros(b), np.linspace(0, 0.999, b), 1.0)
    real = (batch["segment_ids"] > 0).sum(1)
    assert np.all((cuts >= 1) & (cuts < real))
    assert np.array_equal(truncate_cuts(batch["segment_ids"], np.full(b, 0.5), np.zeros(b), 0.5), np.full(b, l))

    out, u = apply_masking(batch, torch.rand(b, l, generator=_gen(6)), _gen(7), 0,
                           MaskingConfig(truncate=Ramp(1.0)), shift_logits=True, pad_id=PAD)
    tail = out["segment_ids"] == 0
    cut = tail.argmax(1)
    assert np.all(cut < real) and np.all(cut >= 1)
    for r in range(b):  # a suffix of the row, made padding; the head unchanged
        assert tail[r, cut[r]:].all() and not tail[r, :cut[r]].any()
        for key in batch:
            assert np.array_equal(out[key][r, :cut[r]], batch[key][r, :cut[r]])
    assert np.all(out["input_ids"][tail] == PAD) and np.all(out["position_ids"][tail] == 0)
    assert out["src_mask"][tail].all()

    # the objective: t = 1 masks every maskable token; none lies in the tail, and the normaliser and token
    # count are those of the shortened rows
    dev = {k: torch.from_numpy(v) for k, v in out.items()}
    t = torch.ones(b)
    _, stats = diffusion_loss(_tiny_model(), dev, t, u, DiffusionConfig(MASK))
    maskable = _maskable(out)
    assert not maskable[tail].any()
    assert stats["num_maskable"].item() == stats["num_loss_positions"].item() == maskable.sum()
    assert stats["normaliser"].item() == maskable.sum() and stats["num_tokens"].item() == (~tail).sum()
    # whatever the tail holds does not change the loss: it is neither attended to nor scored
    model = _tiny_model()
    t = torch.full((b,), 0.6)
    base, _ = diffusion_loss(model, dev, t, u, DiffusionConfig(MASK))
    other = {**dev, "input_ids": dev["input_ids"].clone()}
    other["input_ids"][torch.from_numpy(tail)] = 7
    assert diffusion_loss(model, other, t, u, DiffusionConfig(MASK))[0].item() == base.item()


def test_span_rows_mask_whole_contiguous_tiles():
    batch = _packed(32, 80, seed=8)
    maskable = _maskable(batch)
    b, l = maskable.shape
    u = torch.rand(b, l, generator=_gen(9))
    g = np.random.default_rng(10)
    coin, pick, phase = g.random(b), g.random(b), g.random((b, l))
    lengths = (2, 4, 8)
    new = span_uniforms(u, maskable, batch["segment_ids"], coin, pick, phase, 0.5, lengths)
    assert new.dtype == u.dtype and torch.equal(u[~torch.from_numpy(maskable)], new[~torch.from_numpy(maskable)])
    spans = 0
    for r in range(b):
        k = lengths[int(pick[r] * 3)]
        if coin[r] >= 0.5:
            assert torch.equal(new[r], u[r])
            continue
        # every maskable position takes a uniform of its own row, found at the start of its tile
        values = new[r][maskable[r]]
        assert all(v in set(u[r].tolist()) for v in values.tolist())
        # tiles: maximal runs of equal u inside one example's maskable run; all of length <= k, the inner ones k
        runs, cur = [], None
        for i in range(l):
            key = (batch["segment_ids"][r, i], new[r, i].item()) if maskable[r, i] else None
            if key is not None and key == cur and maskable[r, i - 1]:
                runs[-1].append(i)
            elif key is not None:
                runs.append([i])
            cur = key
        assert all(len(tile) <= k for tile in runs)
        assert all(np.array_equal(tile, np.arange(tile[0], tile[0] + len(tile))) for tile in runs)
        # within one run of maskable positions only the first and last tiles may be cut short
        seg = batch["segment_ids"][r]
        edges = [i for i in range(l)
                 if maskable[r, i] and (i == 0 or not maskable[r, i - 1] or seg[i - 1] != seg[i])]
        for a, b in zip(edges, edges[1:] + [l]):
            inner = [len(tile) for tile in runs if a <= tile[0] < b][1:-1]
            assert all(n == k for n in inner), (k, inner)
        assert u[r, runs[0][0]] == new[r, runs[0][0]]  # a tile keeps its first position's uniform
        spans += 1
        # at any t, the masked set is a union of whole tiles
        t = 0.4
        masked = maskable[r] & (new[r].numpy() < t)
        assert all(masked[tile].all() or not masked[tile].any() for tile in runs)
    assert spans > 8


def test_span_masking_keeps_the_masked_fraction_at_t():
    """Each maskable position is masked with probability t exactly, so a row's expected masked fraction is t
    (the 1/t weight stays the ELBO's), also at the edges of maskable runs where tiles are cut short."""
    rows, l = 3000, 40
    maskable = np.zeros((rows, l), bool)
    maskable[:, 3:37] = True  # one run of 34 maskable positions (a prompt of 3 before it)
    segment_ids = np.ones((rows, l), np.int32)
    g = np.random.default_rng(11)
    u = torch.rand(rows, l, generator=_gen(12))
    new = span_uniforms(u, maskable, segment_ids, np.zeros(rows), g.random(rows), g.random((rows, l)), 1.0, (4, 8))
    for t in (0.1, 0.5, 0.9):
        masked = maskable & (new.numpy() < t)
        frac = masked.sum(1) / maskable.sum(1)
        assert abs(frac.mean() - t) < 0.02, (t, frac.mean())
        edge = masked[:, 3].mean(), masked[:, 36].mean()  # first and last maskable positions
        sd = math.sqrt(t * (1 - t) / rows)
        assert all(abs(e - t) < 5 * sd for e in edge), (t, edge)
        # and spans really are longer than i.i.d. masking's runs: neighbours agree far more often
        agree = (masked[:, 4:36] == masked[:, 5:37]).mean()
        assert agree > t * t + (1 - t) ** 2 + 0.1


# ---- determinism and defaults ---------------------------------------------------------------------------------


def test_masks_replay_for_the_same_step_and_change_with_it():
    batch = _packed(8, 64, seed=13)
    cfg = MaskingConfig(prefix=Ramp(0.5), truncate=Ramp(0.5), span=Ramp(0.5, ramp_steps=10), span_lengths=((2, 4),))
    u = torch.rand(8, 64, generator=_gen(14))
    a = apply_masking(batch, u, _gen(15), 7, cfg, shift_logits=True, pad_id=PAD)
    b = apply_masking(batch, u, _gen(15), 7, cfg, shift_logits=True, pad_id=PAD)
    c = apply_masking(batch, u, _gen(16), 7, cfg, shift_logits=True, pad_id=PAD)
    assert all(np.array_equal(a[0][k], b[0][k]) for k in batch) and torch.equal(a[1], b[1])
    assert not (all(np.array_equal(a[0][k], c[0][k]) for k in batch) and torch.equal(a[1], c[1]))
    # the input is not modified in place
    assert np.array_equal(batch["segment_ids"], _packed(8, 64, seed=13)["segment_ids"]) and torch.equal(
        u, torch.rand(8, 64, generator=_gen(14)))
    # micro-batches taken together get the masks of one batch twice as large
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    parts, u_parts = apply_masking_to_step(halves, u, _gen(15), 7, cfg, shift_logits=True, pad_id=PAD)
    assert torch.equal(u_parts, a[1])
    assert all(np.array_equal(np.concatenate([parts[0][k], parts[1][k]]), a[0][k]) for k in batch)


def test_off_means_untouched_inputs_and_no_draws():
    batch = _packed(4, 32, seed=17)
    u = torch.rand(4, 32, generator=_gen(18))
    for cfg in (None, MaskingConfig(), MaskingConfig(span=Ramp(0.0, ramp_from=0.7, ramp_steps=0))):
        g = _gen(19)
        out, u2 = apply_masking(batch, u, g, 3, cfg, shift_logits=True)
        assert out is batch and u2 is u
        assert torch.equal(torch.rand(5, generator=g), torch.rand(5, generator=_gen(19)))
    # the default config builds no masking at all; a zero-probability ramp that starts above 0 is on
    from train.build import diffusion_config

    class Tok:
        mask_id = MASK

    assert diffusion_config(load_config([]), Tok()).masking is None
    assert diffusion_config(load_config(["diffusion.masking.prefix.ramp_from=0.5",
                                         "diffusion.masking.prefix.ramp_steps=10"]), Tok()).masking is not None


SMALL = ["global_batch_size=4", "data.block_size=64", "eval_max_batches=0", "logging_steps=1",
         "lr_scheduler.warmup_steps=0", "generation.eval_exact_match_examples=0", "diffusion.full_mask_steps=0"]


class _Recorder:
    """Wraps the trainer's batch stream, keeping what it yields."""

    def __init__(self, stream):
        self.stream, self.seen = stream, []

    def __next__(self):
        self.seen.append(next(self.stream))
        return self.seen[-1]

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _capture(monkeypatch, calls, real=None):
    import train.trainer as trainer_module

    def fake(model, optimizer, batches, t_all, u_all, *args):
        calls.append((batches, t_all, u_all))
        if real is not None:
            return real(model, optimizer, batches, t_all, u_all, *args)
        return {"loss": torch.zeros(()), "grad_norm": torch.zeros(()), "loss_positions": torch.zeros(())}

    monkeypatch.setattr(trainer_module, "optimizer_step", fake)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # the step is stubbed
def test_default_run_draws_the_same_noise_and_batches_as_before(tmp_path, monkeypatch, xla_device):
    from train.build import noise_generator
    from train.trainer import Trainer

    trainer = Trainer(load_config(SMALL + [f"output_dir={tmp_path / 'run'}", "gradient_accumulation_steps=2"]),
                      log=lambda *a, **k: None)
    assert trainer.diff_cfg.masking is None
    trainer.stream = _Recorder(trainer.stream)
    calls = []
    _capture(monkeypatch, calls)
    for step in (0, 1):
        trainer.step = step
        trainer.train_step()
        batches, t_all, u_all = calls[-1]
        t_ref, u_ref = draw_noise(4, 64, noise_generator(trainer.cfg.seed, step), sampling_eps=1e-3,
                                  antithetic=True)
        assert torch.equal(t_all, t_ref) and torch.equal(u_all, u_ref)
        assert all(a is b for a, b in zip(batches, trainer.stream.seen[-2:]))  # the stream's own arrays


# ---- configuration ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, key, allowed", [
    ("diffusion.masking.prefix.probability=1.5", "diffusion.masking.prefix.probability", "<= 1"),
    ("diffusion.masking.truncate.probability=-0.1", "diffusion.masking.truncate.probability", ">= 0"),
    ("diffusion.masking.span.ramp_from=2", "diffusion.masking.span.ramp_from", "<= 1"),
    ("diffusion.masking.span.ramp_steps=-3", "diffusion.masking.span.ramp_steps", "non-negative integer"),
    ("diffusion.masking.prefix.ramp_steps=2.5", "diffusion.masking.prefix.ramp_steps", "non-negative integer"),
    ("diffusion.masking.span.lengths=[0,4]", "diffusion.masking.span.lengths", "positive integers"),
    ("diffusion.masking.span.lengths=[]", "diffusion.masking.span.lengths", "positive integers"),
    ("diffusion.masking.span.lengths=[[2],[]]", "diffusion.masking.span.lengths", "list of such lists"),
])
def test_invalid_masking_values_stop_with_one_line(override, key, allowed):
    with pytest.raises(ConfigError) as info:
        load_config([override])
    message = str(info.value)
    assert "\n" not in message and message.startswith(key) and allowed in message


def test_config_builds_the_schedules():
    cfg = load_config(["max_steps=90", "diffusion.masking.prefix.probability=0.25",
                       "diffusion.masking.span.probability=0.5", "diffusion.masking.span.ramp_steps=30",
                       "diffusion.masking.span.lengths=[[2],[2,4],[2,4,8]]"])
    made = MaskingConfig.from_config(cfg.diffusion.masking, total_steps=cfg.max_steps)
    assert made.prefix == Ramp(0.25) and made.truncate == Ramp() and made.span == Ramp(0.5, 0.0, 30)
    assert made.span_lengths == ((2,), (2, 4), (2, 4, 8)) and made.span_lengths_at(60) == (2, 4, 8)
    assert made.probabilities(15) == pytest.approx({"prefix": 0.25, "truncate": 0.0, "span": 0.25})


# ---- end to end ------------------------------------------------------------------------------------------------


def test_a_tiny_run_with_all_three_schedules_trains_with_finite_loss(tmp_path, monkeypatch, xla_device):
    import train.trainer as trainer_module
    from train.trainer import Trainer

    trainer = Trainer(load_config(SMALL + [
        f"output_dir={tmp_path / 'run'}", "max_steps=3", "save_total_limit=1",
        # plain-torch kernels keep this under 10 s; the schedules only produce data the kernels already see
        # (trailing padding, more prompt, other masks)
        "model.attention_kernel=naive", "model.loss_kernel=naive",
        "diffusion.masking.prefix.probability=0.5", "diffusion.masking.truncate.probability=0.5",
        "diffusion.masking.span.probability=1.0", "diffusion.masking.span.ramp_from=0.5",
        "diffusion.masking.span.ramp_steps=2", "diffusion.masking.span.lengths=[[2],[2,4]]"]),
        log=lambda *a, **k: None)
    trainer.stream = _Recorder(trainer.stream)
    calls = []
    _capture(monkeypatch, calls, real=trainer_module.optimizer_step)
    result = trainer.fit()
    assert result.steps_done == 3 and all(math.isfinite(v) for v in result.step_losses.values())
    raw = trainer.stream.seen
    changed = [any(not np.array_equal(b[k], r[k]) for k in r) for (batches, _, _), r in
               zip(calls, raw) for b in batches]
    assert any(changed)  # the schedules did act on the data the steps trained on
    assert all(u.shape == (4, 64) and u.dtype == torch.float32 for _, _, u in calls)
