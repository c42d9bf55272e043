"""Block-diffusion (bd3lm) decoding: autoregressive over blocks, diffusion inside the open block.

A bd3lm model (model/diffusion.py) was trained so that a noised block sees itself and the clean
blocks before it, and a clean block sees the clean blocks up to itself. Decoding follows that pattern
exactly, so the key/value cache is exact (unlike the approximate block caches of mdlm decoding):

1. The first step is one forward over the prompt and the first open block with the block-diffusion
   attention ids: the prompt's whole blocks as clean blocks (their keys and values are recorded for every
   layer) and the open block as a noised block (its predictions are the step's).
2. Each step reveals masked positions of the open block with the sampler's rules (remasking score,
   threshold or factor, temperature, top-k/p). Later steps of a block run the model on the block's
   positions only, attending over the recorded keys and the block's own fresh ones.
3. The first step of every later block runs on the finished block and the new one together: the
   finished block's queries see the cache and themselves (a clean block), the new block's see the cache,
   the finished block and themselves (a noised block). That one call both records the finished block's
   clean keys and values and makes the new block's first predictions, so a block that the threshold
   decodes in one step costs one model call.
4. A row stops at its first end-of-turn token once everything before it is decoded; decoding stops
   when every row has stopped, or after max_new_tokens: any length, block by block.

Blocks start at position 0 of every example (as in training), so the prompt's last, partial block is
the first block decoded, its prompt tokens fixed. Rows are left-padded so that every row's first
open block starts at the same column: one window of `block_size` columns serves every row and step.
With shift_logits the window starts one position earlier (hidden state i predicts token i + 1), and
its first input is the previous block's last token, already fixed.

Static shapes on XLA: the first step, the two-block step and the one-block step are one graph each
(per prompt-length bucket); which block is open, how many tokens to reveal and which cached columns are
visible travel as device tensors. One [2] int32 host read per step ends a block or the decoding early.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import numpy as np
import torch

from train.generate import (PROMPT_BUCKET, GenerationConfig, _i32, _is_xla, _reveal, add_counts, end_step,
                            mask_bias)


def steps_per_block(cfg: GenerationConfig, block_size: int) -> int:
    """Denoising steps per block: generation.steps spread over max_new_tokens (null: one token per step)."""
    total = cfg.steps or cfg.max_new_tokens
    return max(1, min(block_size, -(-total * block_size // cfg.max_new_tokens)))


def layout(prompts: Sequence[Sequence[int]], max_new: int, *, block_size: int, shift: bool, mask_id: int,
           pad_id: int, rows: int | None = None, bucket: int = PROMPT_BUCKET):
    """Host arrays of one batch: ids [R, T] (prompt, then MASK), segment ids and positions [R, T], the
    column `start` where every row's first open window begins, the number of blocks, and
    `generated` [R, T] bool (the columns a row decodes: its answer positions).

    Row r puts position p at column p + off_r, off_r chosen so that its first open block's window,
    positions [b0 * size - shift, ...) with b0 = P_r // size, starts at column `start` for every row."""
    if not prompts:
        raise ValueError("generate: no prompts")
    s = int(shift)
    n = rows if rows is not None else len(prompts)
    if n < len(prompts):
        raise ValueError(f"generate: {len(prompts)} prompts do not fit in {n} rows")
    rows_prompts = [list(prompts[r] if r < len(prompts) else prompts[0]) for r in range(n)]
    first_block = [len(p) // block_size for p in rows_prompts]
    start = max(b * block_size for b in first_block)
    start = -(-start // bucket) * bucket  # bucketed, so prompts of similar lengths share graphs
    num_blocks = max(-(-(len(p) - b * block_size + max_new) // block_size) for p, b in zip(rows_prompts, first_block))
    total = start + s + num_blocks * block_size
    ids = np.full((n, total), pad_id, dtype=np.int64)
    seg = np.zeros((n, total), dtype=np.int32)
    pos = np.zeros((n, total), dtype=np.int32)
    generated = np.zeros((n, total), dtype=bool)
    for r, (prompt, b0) in enumerate(zip(rows_prompts, first_block)):
        off = start + s - b0 * block_size
        p_len = len(prompt)
        ids[r, off:off + p_len] = prompt
        ids[r, off + p_len:] = mask_id
        seg[r, off:] = 1
        pos[r, off:] = np.arange(total - off, dtype=np.int32)
        generated[r, off + p_len:off + p_len + max_new] = True
    return ids, seg, pos, start, num_blocks, generated


@torch.no_grad()
def generate_ids_blockwise(model, prompts: Sequence[Sequence[int]], cfg: GenerationConfig, *, block_size: int,
                           mask_id: int, pad_id: int, shift_logits: bool, device=None, rows: int | None = None,
                           stops: Sequence[int] = (), autocast: Callable[[], Any] = contextlib.nullcontext,
                           stats: dict | None = None, trace: list | None = None) -> np.ndarray:
    """[len(prompts), max_new_tokens] int64 answer ids (pad_id after a row stopped), like
    train.generate.generate_ids. `stats` counts the model calls: "full_steps" (the first, over the whole
    sequence) and "window_steps". `trace` (tests): host copies of the sequence after every step."""
    from model.kv_cache import KVRecorder, KVWindow

    if shift_logits and any(len(p) == 0 for p in prompts):
        raise ValueError("generate: an empty prompt cannot be decoded with shift_logits; give at least one token")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    size, s = block_size, int(shift_logits)
    ids, seg, pos, start, num_blocks, generated = layout(
        prompts, cfg.max_new_tokens, block_size=size, shift=shift_logits, mask_id=mask_id, pad_id=pad_id, rows=rows)
    total = ids.shape[1]
    dev = lambda a, dtype: torch.as_tensor(np.asarray(a), dtype=dtype).to(device)  # noqa: E731
    x = dev(ids, torch.int64)
    segment_ids, position_ids = dev(seg, torch.int32), dev(pos, torch.int32)
    gen_mask = dev(generated, torch.bool)
    common = dict(gen_mask=gen_mask, seed=dev([_i32(cfg.seed)], torch.int32),
                  vocab_bias=mask_bias(model, mask_id, device),
                  stops=dev(list(stops), torch.int64) if cfg.stop_at_eos and stops else None, total=total, cfg=cfg,
                  mask_id=mask_id)
    done = dev(np.zeros(len(ids), dtype=bool), torch.bool)
    n_steps = steps_per_block(cfg, size)
    columns = np.arange(total)
    xla = _is_xla(device)
    counts = {"full_steps": 0, "window_steps": 0}
    keys = values = None
    was_training = model.training
    model.eval()
    if xla:
        from train import runtime

        runtime.sync()
    try:
        counter = dev([0], torch.int32)
        for b in range(num_blocks):
            w0 = start + b * size
            block_cols = dev(np.arange(w0, w0 + size) + s, torch.int64)  # the tokens the window's states predict
            kv_seg = torch.where(dev(columns < w0 + size, torch.bool)[None, :], segment_ids,
                                 torch.zeros_like(segment_ids))
            for i in range(n_steps):
                with autocast():
                    if b == 0 and i == 0:  # clean prompt blocks, recorded; the open block noised
                        # Only the columns up to the open block's end: nothing after it is visible yet. The
                        # cache is zero beyond them (masked by kv_seg until a window writes its own columns).
                        seen = w0 + size
                        ids_bd = _first_step_ids(segment_ids[:, :seen], position_ids[:, :seen],
                                                 dev(columns[:seen], torch.int64), w0, size, shift_logits)
                        recorder = KVRecorder(model.config.num_hidden_layers)
                        hidden = model(x[:, :seen], ids_bd, position_ids[:, :seen], kv=recorder)[:, w0:]
                        pad = (0, 0, 0, total - seen)
                        keys = [torch.nn.functional.pad(k, pad) for k in recorder.keys]
                        values = [torch.nn.functional.pad(v, pad) for v in recorder.values]
                    elif i == 0:  # the finished block (recorded, clean) and the open block (noised) in one call
                        window = dev(np.arange(w0 - size, w0 + size), torch.int64)
                        last = dev(np.repeat([w0 - 1, w0 + size - 1], size), torch.int64)
                        kv = KVWindow(keys, values, kv_seg, window, keep=True, last_visible=last)
                        hidden = _window_forward(model, x, segment_ids, position_ids, window, kv)[:, size:]
                        keys, values = kv.keys, kv.values
                    else:  # the open block alone over the cache
                        window = dev(np.arange(w0, w0 + size), torch.int64)
                        hidden = _window_forward(model, x, segment_ids, position_ids, window,
                                                 KVWindow(keys, values, kv_seg, window))
                    # [1], not a Python int: the count is data, so every step shares one graph
                    steps_left = dev([n_steps - i], torch.int32)
                    x, done, counter, flags = _reveal_step(model, hidden, x, block_cols, done, counter, steps_left,
                                                           **common)
                counts["full_steps" if b == 0 and i == 0 else "window_steps"] += 1
                every_row_done, block_done = end_step(x, flags, xla=xla, trace=trace)
                if every_row_done or block_done:
                    break
            if every_row_done:
                break
        out = x.cpu().numpy()
    finally:
        model.train(was_training)
    add_counts(stats, counts)
    answers = np.full((len(prompts), cfg.max_new_tokens), pad_id, dtype=np.int64)
    for r in range(len(prompts)):
        region = out[r, generated[r]]
        region[region == mask_id] = pad_id
        answers[r, :len(region)] = region
    return answers


def _first_step_ids(segment_ids, position_ids, columns, w0: int, size: int, shift: bool) -> torch.Tensor:
    """Block-diffusion ids of the first step: clean before column w0, the open block noised, padding after."""
    from model.diffusion import block_ids

    clean = block_ids(segment_ids, position_ids, block_size=size, shift=shift, clean=True)
    noised = block_ids(segment_ids, position_ids, block_size=size, shift=shift, clean=False)
    cols = columns[None, :]
    return torch.where(cols < w0, clean, torch.where(cols < w0 + size, noised, torch.zeros_like(clean)))


def _window_forward(model, x, segment_ids, position_ids, window, kv):
    return model(x.index_select(1, window), segment_ids.index_select(1, window),
                 position_ids.index_select(1, window), kv=kv)


def _reveal_step(model, hidden, x, block_cols, done, counter, steps_left, *, gen_mask, seed, vocab_bias, stops,
                 total: int, cfg: GenerationConfig, mask_id: int):
    """Reveal from the open block's hidden states [B, size, H]: returns (x, done, counter, flags [2] int32 =
    (every row done, the block has no masks left)). Each row reveals at least ceil(its masks / steps left)."""
    logits = model.logits(hidden).float() + vocab_bias
    block = x.index_select(1, block_cols)
    masks = (block == mask_id).sum(1, keepdim=True).to(torch.int32)
    n_reveal = torch.div(masks + steps_left - 1, steps_left, rounding_mode="floor")
    new = _reveal(block, logits, block_cols, n_reveal, done, counter, seed, gen_len=total, cfg=cfg, mask_id=mask_id)
    x = x.index_copy(1, block_cols, new)
    if stops is not None:
        done = done | _finished(x, gen_mask, mask_id, stops)
    open_masks = (new == mask_id) & ~done[:, None]
    flags = torch.stack([done.all(), ~open_masks.any()]).to(torch.int32)
    return x, done, counter + 1, flags


def _finished(x, gen_mask, mask_id: int, stops) -> torch.Tensor:
    """[B] bool: the row's first stop token among its answer columns is revealed and nothing before it
    is still masked."""
    is_stop = (x[..., None] == stops).any(-1) & gen_mask
    before_stop = torch.cumsum(is_stop.to(torch.int32), dim=1) == 0
    return is_stop.any(1) & ~((x == mask_id) & gen_mask & before_stop).any(1)
