"""Keys and values kept between denoising steps (train/generate.py's cached decoding modes).

A diffusion LM attends bidirectionally, so no key or value is exact once any token changes. Block-wise
caching (as Fast-dLLM does) rests on the fact that, while one block is being decoded, the tokens
outside it do not change and their keys and values change little. The decoder records every layer's
keys and values in one full forward at the start of each block (`KVRecorder`). The following steps of
that block run the layers only on a window of positions (`KVWindow`):
- the block itself (dual cache: the prefix and the suffix both come from the cache);
- or the block and everything after it (prefix cache).
Each window query attends over all positions, with the window's own fresh keys and values put in place
of the recorded ones. The window is given as a device index tensor, so one compiled graph serves every
block when the window size is fixed.

Window attention is a dense masked softmax here, not the Pallas kernel. The window is a few dozen
queries against a few hundred keys, and the kernel's contract is one segment map for queries and keys
of the same length.
"""

from __future__ import annotations

import torch


class _LayerSlot:
    """Layer i's view of a KVRecorder or KVWindow: what that layer's attention is handed as `kv`."""

    def __init__(self, owner, i: int):
        self.owner, self.i = owner, i

    def attend(self, attention, q, k, v, segment_ids):
        return self.owner.attend(self.i, attention, q, k, v, segment_ids)


class KVRecorder:
    """Passed to the model's forward: each layer's attention stores its (k, v) [B, Hkv, L, D] here
    (after the per-head norm and RoPE: what a later query reads) and attends as usual."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def layer(self, i: int) -> _LayerSlot:
        return _LayerSlot(self, i)

    def attend(self, i: int, attention, q, k, v, segment_ids):
        self.keys[i], self.values[i] = k, v
        return attention.attend(q, k, v, segment_ids)


class KVWindow:
    """Passed to the model's forward for a step over a window of positions.

    keys/values: the recorded per-layer [B, Hkv, L, D]; segment_ids [B, L] of the whole sequence;
    index [W] int64: the window's positions in the sequence (the model's inputs are those positions'
    tokens, segments and positions). Causal models also mask keys after each query's own position.
    keep: the window's fresh keys and values replace the recorded ones in `keys`/`values` (block-diffusion
    decoding records a finished block this way; train/block_decode.py).
    last_visible [W] int64: each window query sees no key after this position (block-diffusion decoding: a
    finished block's queries stop at its own end while the next block's see it); None = no such limit."""

    def __init__(self, keys, values, segment_ids: torch.Tensor, index: torch.Tensor, keep: bool = False,
                 last_visible: torch.Tensor | None = None):
        self.keys, self.values = (list(keys), list(values)) if keep else (keys, values)
        self.keep = keep
        self.last_visible = last_visible
        self.segment_ids = segment_ids.to(torch.int32)
        self.index = index

    def layer(self, i: int) -> _LayerSlot:
        return _LayerSlot(self, i)

    def attend(self, i: int, attention, q, k, v, segment_ids):
        keys = self.keys[i].index_copy(2, self.index, k.to(self.keys[i].dtype))
        values = self.values[i].index_copy(2, self.index, v.to(self.values[i].dtype))
        if self.keep:
            self.keys[i], self.values[i] = keys, values
        if self.last_visible is not None:  # the limit is the query's "position" of the causal rule
            return window_attention(q, keys, values, segment_ids, self.segment_ids, self.last_visible,
                                    causal=True, sm_scale=attention.head_dim ** -0.5)
        return window_attention(q, keys, values, segment_ids, self.segment_ids, self.index,
                                causal=attention.causal, sm_scale=attention.head_dim ** -0.5)


def window_attention(q, k, v, q_segment_ids, kv_segment_ids, q_index, *, causal: bool, sm_scale: float):
    """Segment-masked attention of W queries over L keys with GQA.

    q [B, Hq, W, D]; k, v [B, Hkv, L, D]; q_segment_ids [B, W], kv_segment_ids [B, L] (0 = padding: a
    padding key is never read, a padding query gives 0); q_index [W], each query's position among the
    L keys (for the causal mask). Scores and softmax in fp32, like the kernels."""
    b, hq, w, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    rep = hq // hkv
    # query head h reads kv head h // rep: group the query heads by their kv head, no copy of k or v
    qg = q.reshape(b, hkv, rep * w, d)
    scores = torch.matmul(qg, k.transpose(-1, -2).to(q.dtype)).float().view(b, hkv, rep, w, length) * sm_scale
    q_seg = q_segment_ids.to(torch.int32)
    allowed = (q_seg[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)  # [B, W, L]
    if causal:
        keys_at = torch.arange(length, device=q.device)
        allowed = allowed & (keys_at[None, None, :] <= q_index[None, :, None])
    neg = torch.finfo(torch.float32).min  # finite: a padding query's row stays a number
    scores = scores + torch.where(allowed, 0.0, neg).to(torch.float32)[:, None, None]
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    o = torch.matmul(probs.view(b, hkv, rep * w, length), v).view(b, hq, w, d)
    live = (q_seg != 0)[:, None, :, None]
    return torch.where(live, o, torch.zeros((), dtype=o.dtype, device=o.device))
