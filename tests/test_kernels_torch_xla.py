"""The Pallas kernels through torch_xla: the autograd binding over call_jax (interpret=True on CPU)
against the reference backend, and the full model with the Pallas kernels against the reference."""

import pytest
import torch

import kernels
from model.config import Qwen3Config
from model.diffusion import DiffusionConfig, diffusion_loss
from model.qwen3 import Qwen3ForDiffusionLM

from conftest import packed_segments, xla_sync


def _attention_grads(device, backend, q, k, v, seg, do, causal, block_sizes=None):
    qx, kx, vx = (t.to(device).requires_grad_() for t in (q, k, v))
    o = kernels.masked_attention(qx, kx, vx, seg.to(device), causal=causal, backend=backend,
                                 block_sizes=block_sizes)
    (o * do.to(device)).sum().backward()
    xla_sync()
    return [t.cpu() for t in (o, qx.grad, kx.grad, vx.grad)]


@pytest.mark.parametrize("hq,hkv,rows,length,causal,dtype", [
    # GQA 2, three packed segments then padding, plus a fully padded row; L not a block multiple
    (4, 2, [[70, 50, 1, 40], []], 200, False, torch.float32),
    # GQA 8, causal, one long segment and one-token segments
    (8, 1, [[130], [1, 1, 1, 60]], 130, True, torch.float32),
    (4, 4, [[64, 64], [100]], 128, False, torch.bfloat16),
], ids=["gqa2-packed-padded", "gqa8-causal-onetoken", "mha-bf16"])
def test_attention_interpret_matches_reference_through_torch_xla(xla_device, hq, hkv, rows, length,
                                                                  causal, dtype):
    torch.manual_seed(0)
    b, d = len(rows), 64
    q, do = torch.randn(b, hq, length, d).to(dtype), torch.randn(b, hq, length, d).to(dtype)
    k, v = torch.randn(b, hkv, length, d).to(dtype), torch.randn(b, hkv, length, d).to(dtype)
    seg = packed_segments(length, rows)
    # Small blocks so that several (q, k) block pairs exist and skipping is exercised.
    got = _attention_grads(xla_device, "interpret", q, k, v, seg, do, causal, {"block_q": 64, "block_k": 64})
    want = _attention_grads(xla_device, "reference", q, k, v, seg, do, causal)
    pad = (seg == 0)[:, None, :, None]
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        g, w = g.float(), w.float()
        assert torch.isfinite(g).all(), name
        if dtype == torch.float32:
            assert (g - w).abs().max().item() <= 1e-5, name
        else:
            assert ((g - w).abs().max() / w.abs().max()).item() <= 2e-2, name
    assert got[0].float().masked_select(pad).abs().max().item() == 0.0  # padding queries give 0
    assert got[1].float().masked_select(pad).abs().max().item() == 0.0  # ... and no gradient


def _tiny_model(device, attention_kernel, loss_kernel):
    config = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=10000.0)
    torch.manual_seed(0)
    return Qwen3ForDiffusionLM(config, attention_kernel=attention_kernel, loss_kernel=loss_kernel).to(device)


def _packed_sft_batch(device):
    """Two rows: three packed examples (prompt then response) and one example followed by padding."""
    g = torch.Generator().manual_seed(1)
    b, length = 2, 96
    input_ids = torch.randint(0, 120, (b, length), generator=g, dtype=torch.int32)
    seg = packed_segments(length, [[30, 40, 26], [50]])
    position_ids = torch.zeros_like(seg)
    src_mask = torch.ones(b, length, dtype=torch.bool)
    for r in range(b):
        for sid in seg[r].unique().tolist():
            if sid == 0:
                continue
            idx = (seg[r] == sid).nonzero().flatten()
            position_ids[r, idx] = torch.arange(len(idx), dtype=torch.int32)
            src_mask[r, idx[len(idx) // 2:]] = False  # second half of each example is the response
    batch = {"input_ids": input_ids, "src_mask": src_mask, "segment_ids": seg, "position_ids": position_ids}
    t = torch.tensor([0.3, 0.8])
    u = torch.rand(b, length, generator=g)
    return {k: v.to(device) for k, v in batch.items()}, t.to(device), u.to(device)


def _loss_and_grads(device, attention_kernel, loss_kernel):
    model = _tiny_model(device, attention_kernel, loss_kernel)
    batch, t, u = _packed_sft_batch(device)
    loss, _ = diffusion_loss(model, batch, t, u, DiffusionConfig(mask_token_id=127))
    loss.backward()
    xla_sync()
    return loss.item(), {n: p.grad.cpu() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attention_kernel,loss_kernel", [("pallas", "reference"), ("reference", "pallas")],
                         ids=["pallas-attention", "pallas-loss"])
def test_model_with_pallas_kernels_matches_reference(xla_device, attention_kernel, loss_kernel):
    loss_ref, grads_ref = _loss_and_grads(xla_device, "reference", "reference")
    loss_pal, grads_pal = _loss_and_grads(xla_device, attention_kernel, loss_kernel)
    assert loss_pal == pytest.approx(loss_ref, rel=1e-5)
    for name, g in grads_ref.items():
        scale = max(g.abs().max().item(), 1e-6)
        assert (grads_pal[name] - g).abs().max().item() / scale <= 1e-4, name


def _loss_weights(n, share, generator):
    """Token weights 1/t on `share` of the positions (0 = none, 1 = all; an int = exactly that many)."""
    count = share if isinstance(share, int) else round(share * n)
    weights = torch.zeros(n)
    chosen = torch.randperm(n, generator=generator)[:count]
    weights[chosen] = 1.0 / torch.rand(count, generator=generator).clamp(min=0.1)
    return weights


@pytest.mark.parametrize("v,share,dtype,tied", [
    (1000, 0.2, torch.float32, True),       # V not a multiple of the vocab block; tied head
    (1000, 0.2, torch.float32, False),
    (1000, 0, torch.float32, False),        # no loss positions: loss 0, gradients 0, no NaN
    (1000, 1, torch.float32, False),        # exactly one loss position
    (1000, 1.0, torch.float32, True),       # every position
    (151936, 0.2, torch.float32, False),    # Qwen3's vocabulary
    (1000, 0.2, torch.bfloat16, True),
    (151936, 0.2, torch.bfloat16, False),
], ids=["v1000-20pct-tied", "v1000-20pct-untied", "v1000-none", "v1000-one", "v1000-all-tied",
        "v151936-20pct", "v1000-20pct-bf16-tied", "v151936-20pct-bf16"])
def test_cross_entropy_interpret_matches_reference_through_torch_xla(xla_device, v, share, dtype, tied):
    gen = torch.Generator().manual_seed(0)
    n, h = 96, 64
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * 0.1).to(dtype)
    targets = torch.randint(0, v, (n,), dtype=torch.int32, generator=gen)
    token_weight = _loss_weights(n, share, gen)  # mixed weights 1/t, fp32 as the model passes them
    results = {}
    for backend in ("interpret", "reference"):
        hx, wx = hidden.to(xla_device).requires_grad_(), weight.to(xla_device).requires_grad_()
        loss = kernels.masked_cross_entropy(hx, wx, targets.to(xla_device), token_weight.to(xla_device),
                                            backend=backend)
        assert loss.dtype == torch.float32
        if tied:  # the head weight also serves as the embedding: both gradients must add up
            loss = loss + wx[targets.long().to(xla_device)].float().sum() * 0.5
        loss.backward()
        xla_sync()
        results[backend] = (loss.cpu(), hx.grad.cpu().float(), wx.grad.cpu().float())
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want, name in zip(results["interpret"], results["reference"], ("loss", "d_hidden", "d_weight")):
        assert torch.isfinite(got).all(), name
        if want.abs().max() == 0:  # nothing to learn from: the kernel must give exact zeros
            assert got.abs().max().item() == 0.0, name
        else:
            err = ((got - want).abs().max() / want.abs().max()).item()
            assert err <= tolerance, name
    assert results["interpret"][1][token_weight == 0].abs().sum().item() == 0.0
    if share == 0:
        assert results["interpret"][0].item() == 0.0


def test_loss_kernel_config_reaches_the_cross_entropy_kernel(xla_device):
    n, h, v = 64, 32, 300
    torch.manual_seed(0)
    args = (torch.randn(n, h).to(xla_device), torch.randn(v, h).to(xla_device),
            torch.randint(0, v, (n,), dtype=torch.int32).to(xla_device), torch.ones(n).to(xla_device))
    small = kernels.masked_cross_entropy(*args, backend="interpret",
                                         block_sizes={"block_tokens": 128, "block_vocab": 128, "block_vocab_bwd": 128})
    ref = kernels.masked_cross_entropy(*args, backend="reference")
    assert small.item() == pytest.approx(ref.item(), rel=1e-5)
    with pytest.raises(Exception, match="multiple of 128"):
        kernels.masked_cross_entropy(*args, backend="interpret", block_sizes={"block_tokens": 100}).item()
