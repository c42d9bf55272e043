"""Block diffusion (bd3lm): the attention pattern in every backend, the training forward, and decoding
over the exact key/value cache.

The pattern is checked against a mask written from the BD3-LM paper's definition (noised block b sees
the noised block b and the clean blocks before b; clean block b sees the clean blocks up to b; nothing
sees a noised block of another block; packed examples never meet), not from our id encoding."""

import numpy as np
import pytest
import torch

from model import DiffusionConfig, Qwen3Config, Qwen3ForDiffusionLM, diffusion_loss
from model.diffusion import block_diffusion_inputs, block_ids

MASK = 96
CFG = Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=10000.0)


def paper_mask(segment_ids, position_ids, block_size, shift=False):
    """[B, 2L, 2L] bool for the [noised | clean] layout, from positions and the definition."""
    seg = np.asarray(segment_ids)
    pos = np.asarray(position_ids)
    b, l = seg.shape
    seg2 = np.concatenate([seg, seg], 1)
    blk = np.concatenate([(pos + shift) // block_size] * 2, 1)
    noised = np.concatenate([np.ones((b, l), bool), np.zeros((b, l), bool)], 1)
    same = (seg2[:, :, None] == seg2[:, None, :]) & (seg2[:, :, None] > 0)
    qb, kb = blk[:, :, None], blk[:, None, :]
    qn, kn = noised[:, :, None], noised[:, None, :]
    diag = qn & kn & (qb == kb)                     # noised block sees itself
    offset_causal = qn & ~kn & (kb < qb)            # and the clean blocks before it
    block_causal = ~qn & ~kn & (kb <= qb)           # clean block sees clean blocks up to itself
    return same & (diag | offset_causal | block_causal)


def packed(lengths, total):
    seg = np.zeros(total, np.int32)
    pos = np.zeros(total, np.int32)
    at = 0
    for i, n in enumerate(lengths, start=1):
        seg[at:at + n] = i
        pos[at:at + n] = np.arange(n)
        at += n
    return seg, pos


def bd_ids_np(seg, pos, block_size, shift=False):
    seg_t, pos_t = torch.as_tensor(seg), torch.as_tensor(pos)
    return torch.cat([block_ids(seg_t, pos_t, block_size=block_size, shift=shift, clean=False),
                      block_ids(seg_t, pos_t, block_size=block_size, shift=shift, clean=True)], 1).numpy()


ROWS = [packed([13, 9, 17], 44), packed([44], 44), packed([5, 30], 44)]


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("block_size", [1, 4, 8])
def test_id_rule_is_the_papers_mask(block_size, shift):
    from kernels.reference import block_diffusion_allowed

    seg = np.stack([r[0] for r in ROWS])
    pos = np.stack([r[1] for r in ROWS])
    ids = bd_ids_np(seg, pos, block_size, shift)
    ours = np.asarray(block_diffusion_allowed(ids[:, :, None], ids[:, None, :]))
    np.testing.assert_array_equal(ours, paper_mask(seg, pos, block_size, shift))
    # a block size off by a factor of two is a different pattern: the test can tell
    other = bd_ids_np(seg, pos, block_size * 2, shift)
    assert not np.array_equal(np.asarray(block_diffusion_allowed(other[:, :, None], other[:, None, :])),
                              paper_mask(seg, pos, block_size, shift))


def _dense_attention(q, k, v, mask):
    """float64 attention with an explicit [B, Lq, Lk] mask (GQA by repetition)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, 1), np.repeat(v, rep, 1)
    s = np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1])
    s = np.where(mask[:, None], s, -np.inf)
    m = np.max(s, -1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    p = np.where(mask[:, None], np.exp(s - m), 0)
    den = p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bhkd->bhqd", p / np.where(den > 0, den, 1), v)


@pytest.mark.parametrize("tiles", [(16, 16), (8, 32), (32, 8), (24, 40)])
def test_pallas_kernel_matches_the_explicit_mask_forward_and_backward(tiles):
    """Interpret-mode Pallas kernels (forward, dq, dk/dv) against float64 with the paper's mask, at tile
    sizes that do and do not line up with the blocks; the skipped pairs are really skipped."""
    import jax
    import jax.numpy as jnp

    from kernels import pallas_attention as pa

    block_size = 4
    seg = np.stack([r[0] for r in ROWS])
    pos = np.stack([r[1] for r in ROWS])
    ids = jnp.asarray(bd_ids_np(seg, pos, block_size))
    mask = paper_mask(seg, pos, block_size)
    rng = np.random.default_rng(1)
    b, l2 = ids.shape
    q, k, v = (jnp.asarray(rng.standard_normal((b, h, l2, 8)), jnp.float32) for h in (4, 2, 2))
    o, lse = pa.attention_fwd(q, k, v, ids, causal=False, sm_scale=None, block_sizes=tiles, interpret=True,
                              block_diffusion=True)
    np.testing.assert_allclose(np.asarray(o), _dense_attention(q, k, v, mask), atol=2e-5)

    # gradients of sum(o * g) against jax autodiff of the float32 reference with the explicit mask
    g = jnp.asarray(rng.standard_normal(o.shape), jnp.float32)
    dq, dk, dv = pa.attention_bwd(q, k, v, ids, o, lse, g, causal=False, sm_scale=None, block_sizes=tiles,
                                  interpret=True, block_diffusion=True)

    def dense(q, k, v):
        rep = q.shape[1] // k.shape[1]
        kk, vv = jnp.repeat(k, rep, 1), jnp.repeat(v, rep, 1)
        s = jnp.einsum("bhqd,bhkd->bhqk", q, kk, precision="highest") / np.sqrt(8)
        s = jnp.where(mask[:, None], s, -1e30)
        p = jnp.where(mask[:, None], jax.nn.softmax(s, -1), 0.0)
        return jnp.sum(jnp.einsum("bhqk,bhkd->bhqd", p, vv, precision="highest") * g)

    want = jax.grad(dense, argnums=(0, 1, 2))(q, k, v)
    for got, ref in zip((dq, dk, dv), want):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=5e-5)

    visits = np.asarray(pa.attention_fwd_block_visits(q, k, v, ids, causal=False, block_sizes=tiles,
                                                      block_diffusion=True))
    sched = np.asarray(pa.block_schedule(ids, causal=False, block_q=tiles[0], block_k=tiles[1],
                                         block_diffusion=True))
    np.testing.assert_array_equal(visits[:, 0], sched)
    assert sched.sum() < sched.size  # pairs with nothing visible are not computed


def test_schedule_runs_only_pairs_that_can_meet():
    """One 1,024-token example per row, blocks of 8, 128-tiles: every pair where some query sees some key
    runs (checked against the paper's mask tile by tile); the only others are the 8 diagonal pairs of
    clean queries over noised keys at the same positions (the id ranges overlap, the parities never
    meet). 88 of the 256 pairs run (34%; the share falls towards a quarter as rows grow)."""
    from kernels import pallas_attention as pa

    seg, pos = packed([1024], 1024)
    ids = bd_ids_np(seg[None], pos[None], 8)
    sched = np.asarray(pa.block_schedule(ids, causal=False, block_q=128, block_k=128, block_diffusion=True))[0]
    mask = paper_mask(seg[None], pos[None], 8)[0]
    needed = mask.reshape(16, 128, 16, 128).any(axis=(1, 3))
    assert (sched >= needed).all()
    extra = np.argwhere(sched & ~needed)
    np.testing.assert_array_equal(extra, [[8 + i, i] for i in range(8)])
    assert sched.sum() == 88


def test_torch_backends_agree_on_the_pattern():
    """naive (torch) against the jnp reference's explicit-mask semantics, through the model's ids."""
    from kernels.naive import attention_naive

    seg = np.stack([r[0] for r in ROWS])
    pos = np.stack([r[1] for r in ROWS])
    ids = torch.as_tensor(bd_ids_np(seg, pos, 4))
    mask = paper_mask(seg, pos, 4)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, h, 88, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    got = attention_naive(q, k, v, ids, block_diffusion=True).numpy()
    want = _dense_attention(q.numpy(), k.numpy(), v.numpy(), mask)
    live = (np.concatenate([seg, seg], 1) > 0)[:, None, :, None]
    np.testing.assert_allclose(np.where(live, got, 0), np.where(live, want, 0), atol=1e-6)  # fp32 softmax


# ---- the training forward --------------------------------------------------------------------------


def _model(**kw):
    torch.manual_seed(0)
    return Qwen3ForDiffusionLM(CFG, attention_kernel="naive", loss_kernel="naive", block_diffusion=True, **kw)


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, MASK, (2, 24), generator=g).to(torch.int32)
    seg = torch.tensor([[1] * 14 + [2] * 10, [1] * 20 + [0] * 4], dtype=torch.int32)
    pos = torch.tensor([list(range(14)) + list(range(10)), list(range(20)) + [0] * 4], dtype=torch.int32)
    src = torch.zeros_like(seg, dtype=torch.bool)
    src[:, :3] = True
    return {"input_ids": ids, "src_mask": src, "segment_ids": seg, "position_ids": pos}


@pytest.mark.parametrize("shift", [False, True])
def test_noised_block_sees_only_itself_and_earlier_clean_blocks(shift):
    """Changing a later block (either copy) or the clean copy of the block itself leaves a noised
    block's hidden states unchanged; changing an earlier clean block changes them."""
    model = _model().double()
    batch = _batch()
    size = 4
    noisy = batch["input_ids"].clone()
    noisy[:, 8:] = MASK
    ids2, bd, pos2 = block_diffusion_inputs(batch["input_ids"], noisy, batch["segment_ids"], batch["position_ids"],
                                            block_size=size, shift=shift)
    with torch.no_grad():
        base = model(ids2, bd, pos2)
    l = batch["input_ids"].shape[1]
    query = slice(4 - shift, 8 - shift)  # row 0, noised block 1 (queries shifted with shift)

    def changed(col):
        alt = ids2.clone()
        alt[0, col] = (alt[0, col] + 1) % MASK
        with torch.no_grad():
            out = model(alt, bd, pos2)
        return not torch.allclose(out[0, query], base[0, query], atol=1e-12)

    assert not changed(l + 6)          # its own clean copy
    assert not changed(9)              # the next noised block
    assert not changed(l + 9)          # the next clean block
    assert changed(l + 1)              # an earlier clean block
    assert changed(5)                  # itself


@pytest.mark.parametrize("shift", [False, True])
def test_bd3lm_loss_is_finite_and_trains_every_block(shift):
    model = _model()
    batch = _batch()
    g = torch.Generator().manual_seed(3)
    t = torch.full((2,), 0.5)
    u = torch.rand(2, 24, generator=g)
    cfg = DiffusionConfig(MASK, shift_logits=shift, objective="bd3lm", block_size=4)
    loss, stats = diffusion_loss(model, batch, t, u, cfg)
    loss.backward()
    assert torch.isfinite(loss) and stats["num_loss_positions"] > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(ValueError, match="block_diffusion=True"):
        diffusion_loss(Qwen3ForDiffusionLM(CFG, attention_kernel="naive", loss_kernel="naive"), batch, t, u, cfg)


# ---- decoding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [False, True])
def test_cached_decoding_equals_recomputing_every_step(shift, monkeypatch):
    """Every step's hidden states equal a full forward over the sequence so far, with the finished blocks as
    clean blocks and the open block as a noised one: the cache is exact (the steps over the open block alone
    and the steps that record the finished block while predicting the next)."""
    import train.block_decode as block_decode
    from train.generate import GenerationConfig

    model = _model().double()
    size = 4
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16, 17, 18, 19, 20, 21]]
    cfg = GenerationConfig(max_new_tokens=10, stop_at_eos=False)
    steps = []  # (sequence before the step, open block's first window column, its hidden states)
    real_reveal = block_decode._reveal_step

    def reveal_step(model_, hidden, x, block_cols, *args, **kw):
        steps.append((x.clone(), int(block_cols[0]) - shift, hidden.detach().clone()))
        return real_reveal(model_, hidden, x, block_cols, *args, **kw)

    monkeypatch.setattr(block_decode, "_reveal_step", reveal_step)
    stats = {}
    out = block_decode.generate_ids_blockwise(model, prompts, cfg, block_size=size, mask_id=MASK, pad_id=0,
                                              shift_logits=shift, stats=stats)
    assert out.shape == (3, 10) and not (out == MASK).any()
    assert stats["full_steps"] == 1 and stats["full_steps"] + stats["window_steps"] == len(steps)
    ids, seg, pos, start, num_blocks, _ = block_decode.layout(prompts, 10, block_size=size, shift=shift,
                                                             mask_id=MASK, pad_id=0)
    seg_t, pos_t = torch.as_tensor(seg), torch.as_tensor(pos)
    clean = block_ids(seg_t, pos_t, block_size=size, shift=shift, clean=True)
    noised = block_ids(seg_t, pos_t, block_size=size, shift=shift, clean=False)
    cols = torch.arange(ids.shape[1])
    assert sorted({w for _, w, _ in steps}) == [start + b * size for b in range(num_blocks)]
    for x, w0, hidden in steps:
        bd = torch.where(cols < w0, clean, torch.where(cols < w0 + size, noised, torch.zeros_like(clean)))
        with torch.no_grad():
            full = model(x, bd, pos_t)[:, w0:w0 + size]
        # float64 model; the attention's softmax runs in float32 (as the kernels do), and the first step
        # runs fewer key columns than the full forward, so the sums round differently (~4e-7 seen). A cache
        # that misses or leaks a block differs by orders of magnitude more.
        torch.testing.assert_close(hidden, full, atol=2e-6, rtol=0)


def test_decoding_stops_at_end_of_turn_and_keeps_variable_lengths():
    """A model that predicts token 3 at the first answer position of row 0 and 9 elsewhere, with 3 the
    stop token: row 0 stops in its first block, row 1 decodes every block, and the decoding runs only
    the blocks some row still needs."""
    from train.block_decode import generate_ids_blockwise
    from train.generate import GenerationConfig

    model = _model()
    calls = []

    def logits(hidden):
        calls.append(hidden.shape)
        out = torch.full((*hidden.shape[:2], CFG.vocab_size), -10.0)
        out[..., 9] = 10.0
        if len(calls) == 1:  # the first step of the first block: row 0's answer starts with the stop
            out[0, :, 3] = 20.0
        return out

    model.logits = logits
    stats = {}
    cfg = GenerationConfig(max_new_tokens=12, stop_at_eos=True, threshold=0.5)
    out = generate_ids_blockwise(model, [[1, 2, 4, 5], [4, 5, 6, 7, 8]], cfg, block_size=4, mask_id=MASK,
                                 pad_id=0, shift_logits=False, stops=(3,), stats=stats)
    assert out[0, 0] == 3 and (out[1] == 9).all()
    # threshold 0.5: one step per block; 4 blocks for row 1 (5 prompt tokens + 12): the first step over the
    # whole sequence, then one call per block that records the finished one and predicts the next
    assert stats["full_steps"] == 1 and stats["window_steps"] == 3


# ---- configuration and records -----------------------------------------------------------------------


@pytest.mark.parametrize("overrides,message", [
    (["diffusion.objective=bd4lm"], "diffusion.objective: unknown value 'bd4lm'; allowed: mdlm, bd3lm"),
    (["diffusion.objective=bd3lm", "diffusion.block_size=0"], "diffusion.block_size: must be a positive integer"),
    (["diffusion.objective=bd3lm", "model.causal=true"], "bd3lm needs bidirectional attention"),
])
def test_bad_objective_settings_are_one_line(overrides, message):
    from train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message) as err:
        load_config(overrides)
    assert "\n" not in str(err.value)


def test_the_objective_builds_the_model_and_is_recorded(tmp_path):
    """bd3lm builds a block-diffusion model and DiffusionConfig; the export's config.json records both keys."""
    from train.build import build_model, build_tokenizer, diffusion_config
    from train.config import load_config
    from train.export import diffusion_fields

    cfg = load_config(["diffusion.objective=bd3lm", "diffusion.block_size=16"])
    tok = build_tokenizer(cfg)
    model = build_model(cfg, tok)
    diff = diffusion_config(cfg, tok)
    assert model.block_diffusion and diff.objective == "bd3lm" and diff.block_size == 16
    fields = diffusion_fields(cfg, diff)
    assert fields["diffusion_objective"] == "bd3lm" and fields["diffusion_block_size"] == 16
    plain = load_config([])
    assert not build_model(plain, tok).block_diffusion and diffusion_config(plain, tok).objective == "mdlm"


@pytest.mark.parametrize("shift", [False, True])
def test_block_decoding_on_xla_matches_cpu_with_three_graphs(xla_device, shift):
    """On XLA (the reference kernels through call_jax): the first step, the two-block step and the one-block
    step compile once each and are reused by the next generation; the tokens are those decoded on CPU."""
    from train import runtime
    from train.block_decode import generate_ids_blockwise
    from train.generate import GenerationConfig

    cpu_model = _model()
    torch.manual_seed(0)
    model = Qwen3ForDiffusionLM(CFG, attention_kernel="reference", loss_kernel="reference",
                                block_diffusion=True).to(xla_device)
    runtime.sync()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16, 17, 18, 19, 20, 21]]
    cfg = GenerationConfig(max_new_tokens=10, stop_at_eos=True)
    kw = dict(block_size=4, mask_id=MASK, pad_id=0, shift_logits=shift, stops=(3,))
    cpu = generate_ids_blockwise(cpu_model, prompts, cfg, **kw)
    counts = []
    for _ in range(2):
        before = runtime.compile_count()
        out = generate_ids_blockwise(model, prompts, cfg, device=xla_device, **kw)
        counts.append(runtime.compile_count() - before)
        assert out.tolist() == cpu.tolist()
    assert counts == [3, 0], counts
