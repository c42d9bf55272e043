"""Parity on a real TPU, through torch_xla as training runs the kernels: `PJRT_DEVICE=TPU pytest -m tpu`.

On a TPU VM (with `pip install -e '.[dev,tpu]'`): the Mosaic-compiled kernels against float64
references computed on the host with plain torch (kernels/naive.py): attention's output and its three
gradients, the cross-entropy's loss and both gradients, at the cases the CPU suites check in
Pallas' interpreter; and the train step with the Pallas kernels against the same step with the
reference kernels. Everywhere else these tests skip with the reason.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from conftest import packed_segments, xla_sync
from kernels.naive import attention_naive, cross_entropy_naive
from train import runtime

pytestmark = [pytest.mark.tpu, pytest.mark.skipif(
    not runtime.is_tpu(), reason="needs a TPU: on a TPU VM run PJRT_DEVICE=TPU pytest -m tpu")]

TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2}


def _rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values from the kernel"
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("hq,hkv,rows,length,head_dim,causal,dtype", [
    (16, 8, [[300, 1, 400], [1000]], 1000, 128, True, torch.bfloat16),
    (4, 2, [[70, 50, 1, 40], []], 512, 64, False, torch.float32),
    (32, 8, [[256] * 4, [1024]], 1024, 128, False, torch.bfloat16),
    (4, 2, [[128]], 128, 32, False, torch.float32),
], ids=["gqa2-causal-bf16-L1000", "gqa2-packed-padded-f32", "gqa4-4seg-bf16", "tiny-d32-f32"])
def test_attention_mosaic_matches_float64(hq, hkv, rows, length, head_dim, causal, dtype, xla_device):
    gen = torch.Generator().manual_seed(0)
    b = len(rows)
    q, k, v, do = (torch.randn(b, h, length, head_dim, generator=gen).to(dtype) for h in (hq, hkv, hkv, hq))
    seg = packed_segments(length, rows)
    qx, kx, vx = (t.to(xla_device).requires_grad_() for t in (q, k, v))
    o = kernels.masked_attention(qx, kx, vx, seg.to(xla_device), causal=causal, backend="mosaic")
    (o * do.to(xla_device)).sum().backward()
    xla_sync()
    ours = [t.cpu() for t in (o, qx.grad, kx.grad, vx.grad)]
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o64 = attention_naive(q64, k64, v64, seg, causal=causal)
    (o64 * do.double()).sum().backward()
    for name, a, r in zip(("o", "dq", "dk", "dv"), ours, (o64, q64.grad, k64.grad, v64.grad)):
        assert a.dtype == dtype, name
        assert _rel(a, r.detach()) <= TOL[dtype], name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("n_loss", [0, 1, 410, 2048], ids=["none", "one", "20pct", "all"])
def test_cross_entropy_mosaic_matches_float64(n_loss, dtype, xla_device):
    gen = torch.Generator().manual_seed(11)
    n, h, vocab = 2048, 256, 151936
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(vocab, h, generator=gen) * 0.05).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=gen, dtype=torch.int32)
    tw = torch.zeros(n)
    tw[torch.randperm(n, generator=gen)[:n_loss]] = torch.rand(n_loss, generator=gen) * 5 + 0.1
    hx, wx = hidden.to(xla_device).requires_grad_(), weight.to(xla_device).requires_grad_()
    loss = kernels.masked_cross_entropy(hx, wx, targets.to(xla_device), tw.to(xla_device), backend="mosaic")
    (loss * 1.7).backward()
    xla_sync()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = cross_entropy_naive(h64, w64, targets, tw.double())
    (ref * 1.7).backward()
    if n_loss == 0:
        assert float(loss.cpu()) == 0.0 and not hx.grad.cpu().any() and not wx.grad.cpu().any()
        return
    assert abs(float(loss.cpu()) - float(ref)) <= TOL[dtype] * abs(float(ref))
    assert _rel(hx.grad.cpu(), h64.grad) <= TOL[dtype]
    assert _rel(wx.grad.cpu(), w64.grad) <= TOL[dtype]


def test_train_step_with_pallas_kernels_matches_reference_kernels(tmp_path):
    """Three steps of qwen3-tiny (fp32) on the TPU: the Mosaic kernels and the pure-jnp references
    give the same losses."""
    from train.config import load_config
    from train.trainer import Trainer

    losses = {}
    for kernel in ("pallas", "reference"):
        cfg = load_config(["max_steps=3", "precision=fp32", "generation.eval_exact_match_examples=0",
                           "eval_max_batches=1", f"model.attention_kernel={kernel}", f"model.loss_kernel={kernel}",
                           f"output_dir={tmp_path / kernel}"])
        result = Trainer(cfg, log=lambda *a, **k: None).fit()
        losses[kernel] = [result.step_losses[s] for s in (1, 2, 3)]
    assert losses["pallas"] == pytest.approx(losses["reference"], rel=1e-3)
