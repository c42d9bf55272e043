"""The pure-jnp references: forward semantics and hand-written backward vs JAX autodiff.

Plain JAX only (no torch): the references are the ground truth the other backends are held to, so
they are checked against the most direct formulation possible (repeated K/V, dense softmax,
full-logit CE) differentiated by jax.vjp.
"""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from kernels import reference as ref  # noqa: E402


def _segments(b, l, pattern):
    """pattern: list per row of segment lengths (padding fills the rest with 0)."""
    seg = np.zeros((b, l), np.int32)
    for r, lengths in enumerate(pattern):
        pos = 0
        for sid, n in enumerate(lengths, start=1):
            seg[r, pos:pos + n] = sid
            pos += n
    return jnp.asarray(seg)


def _naive_attention(q, k, v, seg, causal, sm_scale):
    """Repeat K/V to Hq, mask with a large finite negative, zero padding rows afterwards."""
    g = q.shape[1] // k.shape[1]
    k = jnp.repeat(k, g, axis=1).astype(jnp.float32)
    v = jnp.repeat(v, g, axis=1).astype(jnp.float32)
    s = jnp.einsum("bhqd,bhkd->bhqk", q.astype(jnp.float32), k,
                   precision=jax.lax.Precision.HIGHEST) * sm_scale
    mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
    if causal:
        idx = jnp.arange(seg.shape[1])
        mask = mask & (idx[:, None] >= idx[None, :])
    s = jnp.where(mask[:, None], s, -1e30)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhqk,bhkd->bhqd", p, v, precision=jax.lax.Precision.HIGHEST)
    return jnp.where((seg != 0)[:, None, :, None], o, 0.0)


ATTN_CASES = [
    # (B, Hq, Hkv, L, D, segment pattern per row, causal)
    (2, 4, 4, 16, 8, [[16], [10]], False),
    (2, 4, 2, 16, 8, [[5, 7, 4], [3, 1, 6]], False),
    (2, 8, 1, 12, 16, [[12], []], True),  # GQA 8, a fully padded row
    (1, 4, 2, 16, 8, [[1, 1, 9, 2]], True),  # one-token segments, trailing padding
]


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: f"B{c[0]}Hq{c[1]}Hkv{c[2]}c{int(c[6])}")
def test_attention_reference_matches_autodiff(case):
    b, hq, hkv, l, d, pattern, causal = case
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (b, hq, l, d), jnp.float32)
    k = jax.random.normal(keys[1], (b, hkv, l, d), jnp.float32)
    v = jax.random.normal(keys[2], (b, hkv, l, d), jnp.float32)
    do = jax.random.normal(keys[3], (b, hq, l, d), jnp.float32)
    seg = _segments(b, l, pattern)
    scale = 0.3

    @jax.jit  # one compiled program per case (eager jnp would compile op by op)
    def run(q, k, v, seg, do):
        o, lse = ref.attention_reference_fwd(q, k, v, seg, causal=causal, sm_scale=scale)
        grads = ref.attention_reference_bwd(q, k, v, seg, o, lse, do, causal=causal,
                                            sm_scale=scale)
        want, vjp = jax.vjp(lambda q, k, v: _naive_attention(q, k, v, seg, causal, scale),
                            q, k, v)
        return o, lse, grads, want, vjp(do)

    o, lse, grads, want, want_grads = run(q, k, v, seg, do)
    np.testing.assert_allclose(o, want, atol=1e-5, rtol=1e-5)
    assert lse.shape == (b, hq, l) and lse.dtype == jnp.float32
    pad = np.asarray(seg) == 0
    assert np.all(np.asarray(o)[np.broadcast_to(pad[:, None, :], (b, hq, l))] == 0)
    assert np.all(np.asarray(lse)[np.broadcast_to(pad[:, None, :], (b, hq, l))] == 0)

    for got, exp, name in zip(grads, want_grads, "qkv"):
        assert np.all(np.isfinite(got)), name
        np.testing.assert_allclose(got, exp, atol=1e-5, rtol=1e-4, err_msg=f"d{name}")
    # padding queries get exactly zero dq
    dq = np.asarray(grads[0])
    assert np.all(dq[np.broadcast_to(pad[:, None, :, None], dq.shape)] == 0)


def test_attention_reference_no_cross_segment_leak():
    """Changing one segment's keys/values leaves the other segment's outputs bit-identical."""
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    q = jax.random.normal(keys[0], (1, 2, 10, 8))
    k = jax.random.normal(keys[1], (1, 2, 10, 8))
    v = jax.random.normal(keys[2], (1, 2, 10, 8))
    seg = _segments(1, 10, [[4, 6]])
    o1 = ref.attention_reference(q, k, v, seg)
    k2 = k.at[:, :, 4:].set(jax.random.normal(keys[3], (1, 2, 6, 8)))
    v2 = v.at[:, :, 4:].multiply(2.0)
    o2 = ref.attention_reference(q, k2, v2, seg)
    np.testing.assert_array_equal(o1[:, :, :4], o2[:, :, :4])
    assert not np.allclose(o1[:, :, 4:], o2[:, :, 4:])


def test_attention_reference_bf16_and_default_scale():
    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    q = jax.random.normal(keys[0], (1, 4, 16, 64), jnp.float32)
    k = jax.random.normal(keys[1], (1, 2, 16, 64), jnp.float32)
    v = jax.random.normal(keys[2], (1, 2, 16, 64), jnp.float32)
    seg = _segments(1, 16, [[9, 7]])
    o32 = ref.attention_reference(q, k, v, seg)
    np.testing.assert_allclose(o32, _naive_attention(q, k, v, seg, False, 1 / 8.0), atol=1e-5)
    o16 = ref.attention_reference(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                                  v.astype(jnp.bfloat16), seg)
    assert o16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(o16, np.float32), o32, atol=3e-2, rtol=2e-2)


def _naive_ce(hidden, weight, targets, tw):
    logits = jnp.einsum("nh,vh->nv", hidden.astype(jnp.float32), weight.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return jnp.sum(jnp.where(tw > 0, tw * (lse - tgt), 0.0))


@pytest.mark.parametrize("frac", [0.0, 0.3, 1.0])
def test_cross_entropy_reference_matches_autodiff(frac):
    n, h, v = 24, 16, 37
    keys = jax.random.split(jax.random.PRNGKey(3), 5)
    hidden = jax.random.normal(keys[0], (n, h))
    weight = jax.random.normal(keys[1], (v, h)) * 0.5
    targets = jax.random.randint(keys[2], (n,), 0, v, jnp.int32)
    active = jax.random.uniform(keys[3], (n,)) < frac
    tw = jnp.where(active, jax.random.uniform(keys[4], (n,), minval=0.5, maxval=3.0), 0.0)

    @jax.jit
    def run(hidden, weight, targets, tw, g):
        loss, lse = ref.cross_entropy_reference_fwd(hidden, weight, targets, tw)
        dh, dw = ref.cross_entropy_reference_bwd(hidden, weight, targets, tw, lse, g)
        want, vjp = jax.vjp(lambda a, b: _naive_ce(a, b, targets, tw), hidden, weight)
        return loss, lse, dh, dw, want, vjp(g)

    loss, lse, dh, dw, want, (eh, ew) = run(hidden, weight, targets, tw, jnp.float32(0.7))
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-5)
    assert lse.shape == (n,) and lse.dtype == jnp.float32
    np.testing.assert_allclose(dh, eh, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, ew, rtol=1e-5, atol=1e-5)
    if frac == 0.0:
        assert float(loss) == 0.0 and not np.any(dh) and not np.any(dw)


def test_cross_entropy_reference_ignores_garbage_in_unweighted_rows():
    """Rows with weight 0 contribute exactly 0, even if they hold NaN/inf or bad targets."""
    n, h, v = 8, 4, 11
    keys = jax.random.split(jax.random.PRNGKey(4), 3)
    hidden = jax.random.normal(keys[0], (n, h))
    weight = jax.random.normal(keys[1], (v, h))
    targets = jax.random.randint(keys[2], (n,), 0, v, jnp.int32)
    tw = jnp.array([1.0, 0, 2.0, 0, 0, 0.5, 0, 0], jnp.float32)
    clean = ref.cross_entropy_reference_fwd(hidden, weight, targets, tw)
    dirty_h = hidden.at[1].set(jnp.nan).at[3].set(jnp.inf)
    dirty = ref.cross_entropy_reference_fwd(dirty_h, weight, targets, tw)
    assert float(dirty[0]) == float(clean[0])
    dh, dw = ref.cross_entropy_reference_bwd(dirty_h, weight, targets, tw, dirty[1], 1.0)
    assert np.all(np.isfinite(dh)) and np.all(np.isfinite(dw))
    assert not np.any(np.asarray(dh)[np.asarray(tw) == 0])


def test_cross_entropy_reference_bf16_accumulates_in_fp32():
    n, h, v = 64, 32, 50
    keys = jax.random.split(jax.random.PRNGKey(5), 3)
    hidden = jax.random.normal(keys[0], (n, h))
    weight = jax.random.normal(keys[1], (v, h)) * 0.2
    targets = jax.random.randint(keys[2], (n,), 0, v, jnp.int32)
    tw = jnp.ones((n,), jnp.float32)
    loss32, _ = ref.cross_entropy_reference_fwd(hidden, weight, targets, tw)
    loss16, lse16 = ref.cross_entropy_reference_fwd(hidden.astype(jnp.bfloat16),
                                                    weight.astype(jnp.bfloat16), targets, tw)
    assert loss16.dtype == jnp.float32 and lse16.dtype == jnp.float32
    np.testing.assert_allclose(loss16, loss32, rtol=2e-2)
    dh, dw = ref.cross_entropy_reference_bwd(hidden.astype(jnp.bfloat16),
                                             weight.astype(jnp.bfloat16), targets, tw, lse16, 1.0)
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16


def test_reference_rejects_bad_shapes():
    q = jnp.zeros((1, 3, 4, 8))
    kv = jnp.zeros((1, 2, 4, 8))
    with pytest.raises(ValueError, match="multiple"):
        ref.attention_reference(q, kv, kv, jnp.ones((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids"):
        ref.attention_reference(kv, kv, kv, jnp.ones((1, 5), jnp.int32))
    with pytest.raises(ValueError, match="token_weight"):
        ref.cross_entropy_reference(jnp.zeros((4, 8)), jnp.zeros((5, 8)),
                                    jnp.zeros((4,), jnp.int32), jnp.zeros((3,)))


# --------------------------------------------------------------------------------------------------
# The torch binding (kernels.masked_attention / masked_cross_entropy) through torch_xla
# --------------------------------------------------------------------------------------------------

torch = pytest.importorskip("torch")
import kernels  # noqa: E402
from conftest import xla_sync  # noqa: E402


def _attention_inputs(seed=0, b=2, hq=4, hkv=2, l=12, d=8):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, l, d, generator=g) for h in (hq, hkv, hkv))
    seg = torch.tensor([[1] * 5 + [2] * 4 + [0] * (l - 9), [1] * l][:b], dtype=torch.int32)
    do = torch.randn(b, hq, l, d, generator=g)
    return q, k, v, seg, do


def _grads_through(backend, device, causal, q, k, v, seg, do):
    leaves = [x.to(device).requires_grad_() for x in (q, k, v)]
    o = kernels.masked_attention(*leaves, seg.to(device), causal=causal, backend=backend)
    grads = torch.autograd.grad(o, leaves, do.to(device))
    return [x.detach().cpu() for x in (o, *grads)]


@pytest.mark.parametrize("causal", [False, True])
def test_binding_attention_reference_matches_naive(causal, xla_device):
    q, k, v, seg, do = _attention_inputs()
    ref_out = _grads_through("reference", xla_device, causal, q, k, v, seg, do)
    naive_xla = _grads_through("naive", xla_device, causal, q, k, v, seg, do)
    naive_cpu = _grads_through("naive", "cpu", causal, q, k, v, seg, do)
    for a, b, c, name in zip(ref_out, naive_xla, naive_cpu, ("o", "dq", "dk", "dv")):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5, msg=name)
        assert torch.isfinite(a).all()
    pad = (seg == 0)[:, None, :, None].expand_as(ref_out[0])
    assert not ref_out[0][pad].any() and not ref_out[1][pad].any()


def test_binding_cross_entropy_reference_matches_naive(xla_device):
    g = torch.Generator().manual_seed(1)
    n, h, v = 20, 16, 45
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.3
    targets = torch.randint(0, v, (n,), generator=g, dtype=torch.int64)  # int64 is accepted
    tw = torch.where(torch.rand(n, generator=g) < 0.4, 1.0 + torch.rand(n, generator=g), 0.0)

    def run(backend, device):
        hs, ws = hidden.to(device).requires_grad_(), weight.to(device).requires_grad_()
        loss = kernels.masked_cross_entropy(hs, ws, targets.to(device), tw.to(device),
                                            backend=backend)
        (loss * 0.5).backward()
        return [x.detach().cpu() for x in (loss, hs.grad, ws.grad)]

    got = run("reference", xla_device)
    assert got[0].dtype == torch.float32 and got[0].shape == ()
    for want in (run("naive", xla_device), run("naive", "cpu")):
        for a, b, name in zip(got, want, ("loss", "d_hidden", "d_weight")):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    assert not got[1][tw == 0].any()  # unweighted rows get no gradient


def test_call_jax_cache_hits_for_same_shapes_and_statics(xla_device):
    """Two identical fwd+bwd calls: the JAX functions are traced once and the torch_xla graph is
    compiled once; a new static value (sm_scale) is a new entry, not a re-trace of the old."""
    import torch_xla.debug.metrics as met

    from kernels import binding

    q, k, v, seg, do = (x.to(xla_device) for x in _attention_inputs(seed=3, l=10))
    q.requires_grad_()

    def step(scale):
        o = kernels.masked_attention(q, k, v, seg, sm_scale=scale, backend="reference")
        (dq,) = torch.autograd.grad(o, [q], do)
        xla_sync()
        return dq

    def counts():
        data = met.metric_data("CompileTime")
        return (binding.traced_count(),
                data[0] if data else 0, met.counter_value("CachedCompile") or 0)

    step(0.25)
    traced0, compiled0, cached0 = counts()
    step(0.25)
    traced1, compiled1, cached1 = counts()
    assert traced1 == traced0, "same shapes and statics re-traced the JAX function"
    assert compiled1 == compiled0, "same graph compiled twice"
    assert cached1 == cached0 + 1
    step(0.5)
    traced2, compiled2, _ = counts()
    assert traced2 == traced1 + 2  # fwd and bwd specialised for the new sm_scale
    assert compiled2 == compiled1 + 1


def test_backend_resolution(monkeypatch):
    monkeypatch.delenv(kernels.ENV_BACKEND, raising=False)
    assert kernels.resolve_backend(None) == "reference"
    assert kernels.resolve_backend("pallas") == "interpret"  # no TPU here
    monkeypatch.setenv(kernels.ENV_BACKEND, "naive")
    assert kernels.resolve_backend(None) == "naive"
    assert kernels.resolve_backend("reference") == "reference"  # the caller wins
    monkeypatch.setenv(kernels.ENV_BACKEND, "cuda")
    with pytest.raises(ValueError, match=r"\$PALLAS_DLM_BACKEND='cuda' is unknown"):
        kernels.resolve_backend(None)
    with pytest.raises(ValueError, match="backend='fast' is unknown"):
        kernels.resolve_backend("fast")


def test_missing_pallas_backend_is_a_clear_error(monkeypatch):
    from kernels import binding

    monkeypatch.setitem(kernels._PALLAS_MODULES, "cross_entropy", "kernels._not_written_yet")
    monkeypatch.delitem(kernels._REGISTRY, ("cross_entropy", "mosaic"), raising=False)
    with pytest.raises(NotImplementedError, match="no Pallas cross_entropy kernel"):
        binding.masked_cross_entropy(torch.zeros(2, 4), torch.zeros(3, 4),
                                     torch.zeros(2, dtype=torch.int32), torch.ones(2),
                                     backend="mosaic")


def test_registered_backend_gets_its_statics_and_block_sizes(monkeypatch, xla_device):
    """A registered pair receives the static kwargs the registry and the caller give it."""
    seen = []
    monkeypatch.setitem(kernels._REGISTRY, ("cross_entropy", "interpret"), None)
    kernels.register_backend("cross_entropy", "interpret", _spy_fwd, _spy_bwd,
                             static={"interpret": True})
    _SPY.append(seen)
    try:
        h = torch.randn(4, 8).to(xla_device).requires_grad_()
        w = torch.randn(5, 8).to(xla_device)
        loss = kernels.masked_cross_entropy(h, w, torch.zeros(4, dtype=torch.int32).to(xla_device),
                                            torch.ones(4).to(xla_device), backend="pallas",
                                            block_sizes={"block_n": 8, "block_v": [16]})
        loss.backward()
        xla_sync()
    finally:
        _SPY.clear()
    assert seen == [("fwd", {"interpret": True, "block_sizes": {"block_n": 8, "block_v": (16,)}}),
                    ("bwd", {"interpret": True, "block_sizes": {"block_n": 8, "block_v": (16,)}})]
    with pytest.raises(ValueError, match="cannot register backend 'naive'"):
        kernels.register_backend("attention", "naive", _spy_fwd, _spy_bwd)


_SPY = []


def _spy_fwd(hidden, weight, targets, token_weight, **static):
    _SPY[-1].append(("fwd", static))
    return ref.cross_entropy_reference_fwd(hidden, weight, targets, token_weight)


def _spy_bwd(hidden, weight, targets, token_weight, lse, g, **static):
    _SPY[-1].append(("bwd", static))
    return ref.cross_entropy_reference_bwd(hidden, weight, targets, token_weight, lse, g)


def test_jax_backend_refuses_cpu_tensors():
    q, k, v, seg, _ = _attention_inputs()
    with pytest.raises(ValueError, match="needs tensors on the XLA device"):
        kernels.masked_attention(q, k, v, seg, backend="reference")
