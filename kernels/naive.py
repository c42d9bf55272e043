"""The "naive" backend: plain torch ops, autograd by torch, any device.

This is the seed trainer's design and the benchmark baseline for the fused kernels: attention
materialises K/V repeated to every query head and a dense [B, H, L, L] score matrix with an additive
mask; cross-entropy projects every token to full logits, upcasts them to fp32, computes CE
everywhere and zeroes the unweighted positions afterwards. Same semantics as kernels.reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attention_naive(q, k, v, segment_ids, *, causal: bool = False, sm_scale: float | None = None,
                    block_diffusion: bool = False):
    b, hq, l, d = q.shape
    hkv = k.shape[1]
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(d)
    if hq != hkv:
        # query head h uses kv head h // (hq // hkv), as Hugging Face's repeat_kv
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    seg = segment_ids
    if block_diffusion:  # kernels/__init__.py: (segment << BD_CODE_BITS) | code
        from kernels import BD_CODE_BITS

        qi, ki = seg[:, :, None], seg[:, None, :]
        allowed = ((qi >> BD_CODE_BITS) == (ki >> BD_CODE_BITS)) & (qi != 0) & (
            (ki == qi) | (((ki & 1) == 1) & (ki < qi)))
    else:
        allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
    if causal:
        idx = torch.arange(l, device=q.device)
        allowed = allowed & (idx[:, None] >= idx[None, :])
    # Additive mask with the most negative finite fp32 instead of -inf: a padding query sees no key
    # at all, and an all -inf row would make softmax (and its backward) NaN.
    neg = torch.finfo(torch.float32).min
    bias = torch.where(allowed, 0.0, neg).to(torch.float32)[:, None]
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * sm_scale + bias
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    o = torch.matmul(probs, v)
    live = (seg != 0)[:, None, :, None]
    return torch.where(live, o, torch.zeros((), dtype=o.dtype, device=o.device))


def cross_entropy_naive(hidden, weight, targets, token_weight):
    logits = torch.matmul(hidden, weight.t()).float()
    ce = F.cross_entropy(logits, targets.long(), reduction="none")
    active = token_weight > 0
    per_token = torch.where(active, token_weight.float() * ce, torch.zeros_like(ce))
    return per_token.sum()
