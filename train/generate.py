"""Diffusion generation: low-confidence remasking with semi-autoregressive blocks.

`python -m train.generate <checkpoint> --prompt "Reverse: abcde" [--prompt ...] | --prompts-file F`

How a batch is laid out (all rows share one static shape `[B, P + G]`): each prompt is LEFT-padded to
the common prompt length P (padding = segment 0, attends nowhere), followed by G = max_new_tokens MASK
tokens; prompt and generation form segment 1 with positions restarting at 0 at the first real prompt
token, exactly like one packed training example. The generation region is cut into blocks of
`block_length`, decoded left to right; within a block, each step predicts every masked position,
scores the predictions with a confidence rule and reveals the most confident ones, the same number in
every row (every row starts the block with the same number of masks), so a row never writes outside
its own generation region and prompt tokens are never touched.

Static shapes for XLA: one denoising step is one graph. Which block is open and how many tokens to
reveal come from a small schedule table on the device, indexed by a step counter that also lives on
the device, so every step of every block runs the same compiled graph and the host never reads a
value inside the loop (one `sync()` per step cuts the graph). Selection is by ranks (argsort of the
confidence) compared with the reveal count, never by boolean indexing. Randomness (Gumbel noise for
temperature sampling, scores for `random` remasking) comes from a counter-based integer hash of
(seed, step, row, position, vocabulary id) computed on the device: seeded, reproducible, identical on
every device, and no host noise of size [B, G, V] is ever transferred.
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch is imported: may re-execute this command (train/hostmem.py)
    from train.hostmem import use_hugepage_malloc

    use_hugepage_malloc()

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

REMASKING = ("maskgit_plus", "topk_margin", "entropy", "random")
# Rules whose score is a probability-like number in [0, 1], which a threshold or the factor rule compares.
PARALLEL_RULES = ("maskgit_plus", "topk_margin")
CACHE_MODES = ("none", "prefix", "dual")
# Prompts are left-padded up to a multiple of this, so prompts of similar lengths share one compiled graph.
PROMPT_BUCKET = 8
# Keys of the config's `generation:` section that are not sampler settings.
_EVAL_KEYS = ("eval_exact_match_examples", "eval_show_examples")


def _config_error(message: str) -> Exception:
    from train.config import ConfigError

    return ConfigError(message)


@dataclass(frozen=True)
class GenerationConfig:
    """Sampler settings (the `generation:` section of the training config).

    max_new_tokens: length G of the generation region (answers stop at the first <|im_end|>/EOS in it).
    steps: denoising steps in total, split as evenly as possible across blocks (null = max_new_tokens,
        one token per step). block_length: semi-autoregressive block size (null = max_new_tokens: one
        block). remasking: which masked positions to reveal each step — maskgit_plus (highest
        probability of the predicted token), topk_margin (top-1 minus top-2 probability), entropy
        (lowest entropy), random. temperature: 0 = greedy argmax, > 0 = Gumbel-max sampling from
        softmax(logits / temperature). top_p / top_k: nucleus / top-k filtering before sampling (1.0 / 0
        = off). seed: the noise seed. batch_size: prompts per generation call.

    Faster decoding (README, "Decoding"): threshold: also reveal, in each step, every masked position
    of the open block whose score exceeds this (parallel unmasking; the schedule's count stays the
    minimum, and a block ends as soon as it has no masks left). factor: the same with Fast-dLLM's factor
    rule instead of a fixed threshold (the n most confident positions whose n-th score is at least
    1 - factor / (n + 1)). cache: none | prefix | dual: the first step of a block runs the whole
    sequence and records every layer's keys and values. The block's later steps then run only the block
    and what follows it (prefix), or only the block (dual); everything else is read from the record.
    stop_at_eos: a row stops once its first <|im_end|>/EOS is revealed and every position before it is
    decoded (its answer cannot change any more); decoding ends when every row has stopped.
    """

    max_new_tokens: int = 16
    steps: int | None = None
    block_length: int | None = None
    remasking: str = "maskgit_plus"
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    batch_size: int = 64
    threshold: float | None = None
    factor: float | None = None
    cache: str = "none"
    stop_at_eos: bool = True

    def __post_init__(self):
        def positive(key, value, allow_none=False):
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _config_error(f"generation.{key}: must be a positive integer"
                                    f"{' or null' if allow_none else ''}, got {value!r}")

        positive("max_new_tokens", self.max_new_tokens)
        positive("steps", self.steps, allow_none=True)
        positive("block_length", self.block_length, allow_none=True)
        positive("batch_size", self.batch_size)
        if self.remasking not in REMASKING:
            raise _config_error(f"generation.remasking: unknown value {self.remasking!r}; "
                                f"allowed: {', '.join(REMASKING)}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise _config_error(f"generation.temperature: must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise _config_error(f"generation.top_p: must be in (0, 1] (1 = off), got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise _config_error(f"generation.top_k: must be a non-negative integer (0 = off), got {self.top_k!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise _config_error(f"generation.seed: must be an integer, got {self.seed!r}")
        if self.threshold is not None and (isinstance(self.threshold, bool)
                                           or not isinstance(self.threshold, (int, float))
                                           or not 0 < self.threshold <= 1):
            raise _config_error(f"generation.threshold: must be in (0, 1] or null (off), got {self.threshold!r}")
        if self.factor is not None and (isinstance(self.factor, bool) or not isinstance(self.factor, (int, float))
                                        or not self.factor > 0):
            raise _config_error(f"generation.factor: must be > 0 or null (off), got {self.factor!r}")
        if self.threshold is not None and self.factor is not None:
            raise _config_error("generation.factor: set threshold or factor, not both")
        if self.parallel and self.remasking not in PARALLEL_RULES:
            raise _config_error(f"generation.remasking: {self.remasking!r} gives no score in [0, 1] to compare "
                                f"with threshold/factor; use one of {', '.join(PARALLEL_RULES)}")
        if self.cache not in CACHE_MODES:
            raise _config_error(f"generation.cache: unknown value {self.cache!r}; allowed: {', '.join(CACHE_MODES)}")
        if not isinstance(self.stop_at_eos, bool):
            raise _config_error(f"generation.stop_at_eos: must be true or false, got {self.stop_at_eos!r}")
        blocks = self.num_blocks
        if self.total_steps_requested < blocks:
            raise _config_error(f"generation.steps: {self.steps} steps cannot cover {blocks} blocks "
                                f"(max_new_tokens {self.max_new_tokens} / block_length {self.block}); "
                                f"use at least {blocks}")

    @classmethod
    def from_config(cls, node: Any = None, **overrides) -> "GenerationConfig":
        """From a config's `generation:` section (DictConfig or dict; eval-only keys ignored);
        `overrides` with value None are ignored, so argparse defaults can be passed straight in."""
        values: dict[str, Any] = {}
        if node is not None:
            if not isinstance(node, dict):
                from omegaconf import OmegaConf

                node = OmegaConf.to_container(node, resolve=True)
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(node) - known - set(_EVAL_KEYS))
            if unknown:
                raise _config_error(f"generation.{unknown[0]}: unknown key; allowed: "
                                    f"{', '.join(sorted(known | set(_EVAL_KEYS)))}")
            values = {k: v for k, v in node.items() if k in known}
        values.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(values.get("temperature"), int):
            values["temperature"] = float(values["temperature"])
        for key in ("top_p", "threshold", "factor"):
            if isinstance(values.get(key), int) and not isinstance(values.get(key), bool):
                values[key] = float(values[key])
        return cls(**values)

    @property
    def parallel(self) -> bool:
        """Whether a step may reveal more than the schedule's count (threshold or factor rule)."""
        return self.threshold is not None or self.factor is not None

    @property
    def block(self) -> int:
        return min(self.block_length or self.max_new_tokens, self.max_new_tokens)

    @property
    def num_blocks(self) -> int:
        return -(-self.max_new_tokens // self.block)

    @property
    def total_steps_requested(self) -> int:
        return self.steps or self.max_new_tokens

    def schedule(self) -> list[tuple[int, int, int]]:
        """One (block_start, block_end, tokens_to_reveal) per denoising step, offsets in the generation
        region. Steps are split across blocks as evenly as possible (earlier blocks get the remainder);
        a block never gets more steps than it has tokens; within a block the reveal counts differ by at
        most one (earlier steps get the remainder) and sum to the block's length."""
        out = []
        g, size, nb = self.max_new_tokens, self.block, self.num_blocks
        s = self.total_steps_requested
        for b in range(nb):
            start, end = b * size, min((b + 1) * size, g)
            length = end - start
            steps_b = min(s // nb + (1 if b < s % nb else 0), length)
            for i in range(steps_b):
                out.append((start, end, length // steps_b + (1 if i < length % steps_b else 0)))
        return out

    def block_plan(self) -> list[tuple[int, int, list[int]]]:
        """schedule() grouped by block: (block_start, block_end, [tokens_to_reveal per step])."""
        plan: list[tuple[int, int, list[int]]] = []
        for start, end, n in self.schedule():
            if not plan or plan[-1][0] != start:
                plan.append((start, end, []))
            plan[-1][2].append(n)
        return plan

    def describe(self, diffusion=None) -> str:
        """One line of the settings; `diffusion` (a DiffusionConfig) says how a bd3lm model decodes."""
        steps = f"{len(self.schedule())} steps"
        blocks = f"block_length {self.block}"
        if getattr(diffusion, "objective", "mdlm") == "bd3lm":
            from train.block_decode import steps_per_block

            size = diffusion.block_size
            steps = f"{steps_per_block(self, size)} steps per block"
            blocks = f"bd3lm blocks of {size} over an exact cache"
        return (f"{self.remasking}, {'at most ' if self.parallel or self.stop_at_eos else ''}{steps}, "
                f"max_new_tokens {self.max_new_tokens}, {blocks}, temperature {self.temperature:g}"
                + (f", top_p {self.top_p:g}" if self.top_p < 1 else "")
                + (f", top_k {self.top_k}" if self.top_k else "")
                + (f", seed {self.seed}" if self.temperature > 0 or self.remasking == "random" else "")
                + (f", threshold {self.threshold:g}" if self.threshold is not None else "")
                + (f", factor {self.factor:g}" if self.factor is not None else "")
                + (f", cache {self.cache}" if self.cache != "none" else "")
                + ("" if self.stop_at_eos else ", no early stop"))


# ---- counter-based device noise -------------------------------------------------------------------

def _i32(value: int) -> int:
    """A 32-bit pattern as the signed int32 value torch/XLA store."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= (1 << 31) else value


_CONSTANTS: dict[tuple[str, int], torch.Tensor] = {}


def _k(value: int, device) -> torch.Tensor:
    """A 32-bit constant as an int32 tensor on `device`, made once per device. torch_xla 2.9 carries
    Python int scalars through floating point, which cannot hold every 32-bit pattern (`x & 0x7FFFFFFF`
    fails to lower), so the hash's constants enter the graph as device data instead."""
    key = (str(device), _i32(value))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor([key[1]], dtype=torch.int32).to(device)
    return _CONSTANTS[key]


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int32 by 0 < k < 31. Only non-negative values are shifted: torch's >>
    is arithmetic, and torch_xla 2.9 rounds negative values toward zero (-7 >> 3 == 0 there), so the
    sign bit is cleared first and put back at its shifted place."""
    return ((x & _k(0x7FFFFFFF, x.device)) >> k) | ((x < 0).to(x.dtype) * (1 << (31 - k)))


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply, constants of Wellons' "lowbias32") on int32 tensors.
    Multiplication wraps modulo 2^32 on CPU and in XLA alike, so results agree across devices."""
    x = x ^ _srl(x, 16)
    x = x * _k(0x7FEB352D, x.device)
    x = x ^ _srl(x, 15)
    x = x * _k(0x846CA68B, x.device)
    return x ^ _srl(x, 16)


def hash_uniform(h: torch.Tensor) -> torch.Tensor:
    """int32 hash -> float32 uniform strictly inside (0, 1) (24 random bits)."""
    return (_srl(h, 8).float() + 0.5) * (1.0 / (1 << 24))


def _step_key(seed: torch.Tensor, counter: torch.Tensor, stream: int) -> torch.Tensor:
    dev = seed.device
    return mix32(mix32(seed ^ _k(0x9E3779B9 * (stream + 1), dev)) + mix32(counter + _k(0x632BE5AB, dev)))


def _position_keys(key: torch.Tensor, rows: int, length: int) -> torch.Tensor:
    idx = torch.arange(rows * length, device=key.device, dtype=torch.int32).view(rows, length)
    return mix32(key + mix32(idx))


# ---- one denoising step -------------------------------------------------------------------------

def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then nucleus filtering (removed entries become -inf); static choices, no host reads."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it does
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter(-1, order, sorted_logits)
    return logits


def confidence(logits: torch.Tensor, x0: torch.Tensor, rule: str,
               uniform: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """[B, G] score of each prediction; higher = revealed earlier. logits [B, G, V] fp32 (filtered),
    x0 [B, G] the predicted tokens."""
    if rule == "random":
        return uniform()
    logp = torch.log_softmax(logits, dim=-1)
    if rule == "maskgit_plus":  # probability of the chosen token (= top probability when greedy)
        return logp.gather(-1, x0.unsqueeze(-1)).squeeze(-1).exp()
    if rule == "topk_margin":
        top2 = torch.topk(logp, 2, dim=-1).values.exp()
        return top2[..., 0] - top2[..., 1]
    if rule == "entropy":  # negative entropy; filtered (-inf) entries contribute 0
        p = logp.exp()
        return torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    raise ValueError(f"generation.remasking: unknown value {rule!r}; allowed: {', '.join(REMASKING)}")


def _reveal(gen, logits, offsets, n_reveal, done, counter, seed, *, gen_len: int, cfg: GenerationConfig,
            mask_id: int):
    """One step's choice in the open block: gen [B, R] its tokens, at region offsets `offsets` [R];
    logits [B, R, V] their predictions. Returns the new gen [B, R]. Noise is keyed by (row, region
    offset), so a block draws what it would draw as part of the whole region."""
    rows = gen.shape[0]
    logits = filter_logits(logits, cfg.top_k, cfg.top_p)

    def position_keys(stream):
        return _position_keys(_step_key(seed, counter, stream), rows, gen_len).index_select(1, offsets)

    if cfg.temperature > 0:
        vocab = logits.shape[-1]
        vocab_keys = mix32(torch.arange(vocab, device=gen.device, dtype=torch.int32) * _k(0x9E3779B9, gen.device) + 1)
        u = hash_uniform(mix32(position_keys(0).unsqueeze(-1) ^ vocab_keys))
        gumbel = -torch.log(-torch.log(u))
        x0 = torch.argmax(logits / cfg.temperature + gumbel, dim=-1)
    else:
        x0 = torch.argmax(logits, dim=-1)
    conf = confidence(logits, x0, cfg.remasking, uniform=lambda: hash_uniform(position_keys(1)))

    candidate = (gen == mask_id) & ~done[:, None]
    conf = torch.where(candidate, conf, torch.full_like(conf, float("-inf")))
    order = torch.argsort(conf, dim=-1, descending=True, stable=True)
    ranks = torch.argsort(order, dim=-1)  # rank of each position in confidence order
    chosen = ranks < n_reveal
    if cfg.threshold is not None:
        chosen = chosen | (conf > cfg.threshold)
    if cfg.factor is not None:  # rank r is the (r+1)-th most confident: kept while c >= 1 - f / (r + 2)
        chosen = chosen | (conf >= 1.0 - cfg.factor / (ranks + 2).float())
    return torch.where(candidate & chosen, x0.to(gen.dtype), gen)


def _finished(gen, mask_id: int, stops: torch.Tensor) -> torch.Tensor:
    """[B] bool: the row's first stop token is revealed and nothing before it is still masked."""
    is_stop = (gen[..., None] == stops).any(-1)
    before_stop = torch.cumsum(is_stop.to(torch.int32), dim=1) == 0
    return is_stop.any(1) & ~((gen == mask_id) & before_stop).any(1)


def _step(model, x, segment_ids, position_ids, n_reveals, counter, seed, vocab_bias, done, stops,
          block_offsets, kv, window, *, prompt_len: int, gen_len: int, cfg: GenerationConfig, mask_id: int,
          shift: bool):
    """One denoising step of the open block (region offsets `block_offsets` [R]); returns the new
    (x, counter, done, flags), flags [2] int32 = (every row done, the block done). Everything that
    changes between steps is a tensor input, so blocks of one size share one traced graph.

    window None: the model runs on the whole sequence (kv: None, or a model.kv_cache.KVRecorder that
    keeps every layer's keys and values for the block's later steps). window [W]: the model runs on
    those positions only (the block, or the block and the rest; with shift starting one position
    before the block), attending over the recorded keys (kv: a KVWindow), and the block's predictions
    are the window's first R hidden states. The LM head runs on the block only."""
    n_reveal = n_reveals.index_select(0, counter).view(())
    lead = 1 if shift else 0  # shift: hidden at i-1 predicts token i
    if window is None:
        hidden = model(x, segment_ids, position_ids) if kv is None else model(x, segment_ids, position_ids, kv=kv)
        hidden = hidden.index_select(1, block_offsets + (prompt_len - lead))
    else:
        hidden = model(x.index_select(1, window), segment_ids.index_select(1, window),
                       position_ids.index_select(1, window), kv=kv)[:, :block_offsets.shape[0]]
    logits = model.logits(hidden).float() + vocab_bias
    columns = block_offsets + prompt_len
    block = _reveal(x.index_select(1, columns), logits, block_offsets, n_reveal, done, counter, seed,
                    gen_len=gen_len, cfg=cfg, mask_id=mask_id)
    x = x.index_copy(1, columns, block)
    if stops is not None:
        done = done | _finished(x[:, prompt_len:], mask_id, stops)
    open_masks = (block == mask_id) & ~done[:, None]
    flags = torch.stack([done.all(), ~open_masks.any()]).to(torch.int32)
    return x, counter + 1, done, flags


# ---- batches of prompts --------------------------------------------------------------------------

def layout(prompts: Sequence[Sequence[int]], gen_len: int, *, mask_id: int, pad_id: int,
           prompt_len: int | None = None, rows: int | None = None):
    """(input_ids, segment_ids, position_ids) int numpy [rows, P + G] and P: prompts left-padded to P
    (segment 0), MASK x G after them, segment 1 and positions from 0 over prompt + generation. `rows`
    pads the batch with copies of the first prompt (their outputs are dropped by the caller)."""
    if not prompts:
        raise ValueError("generate: no prompts")
    longest = max(len(p) for p in prompts)
    p_len = prompt_len if prompt_len is not None else -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    if p_len < longest:
        raise ValueError(f"generate: prompt_len {p_len} is shorter than the longest prompt ({longest} tokens)")
    n = rows if rows is not None else len(prompts)
    if n < len(prompts):
        raise ValueError(f"generate: {len(prompts)} prompts do not fit in {n} rows")
    total = p_len + gen_len
    ids = np.full((n, total), pad_id, dtype=np.int64)
    seg = np.zeros((n, total), dtype=np.int32)
    pos = np.zeros((n, total), dtype=np.int32)
    for r in range(n):
        prompt = list(prompts[r] if r < len(prompts) else prompts[0])
        start = p_len - len(prompt)
        ids[r, start:p_len] = prompt
        ids[r, p_len:] = mask_id
        seg[r, start:] = 1
        pos[r, start:] = np.arange(total - start, dtype=np.int32)
    return ids, seg, pos, p_len


def _is_xla(device) -> bool:
    return torch.device(device).type == "xla"


@torch.no_grad()
def generate_ids(model, prompts: Sequence[Sequence[int]], cfg: GenerationConfig, *, mask_id: int,
                 pad_id: int, shift_logits: bool = True, device=None, prompt_len: int | None = None,
                 rows: int | None = None, stops: Sequence[int] = (),
                 autocast: Callable[[], Any] = contextlib.nullcontext, trace: list | None = None,
                 stats: dict | None = None) -> np.ndarray:
    """Token ids of the whole generation region, [len(prompts), max_new_tokens] int64 (no truncation).

    prompt_len / rows fix the padded shape (several calls then share compiled steps). `stops`: the
    end-of-answer token ids (for cfg.stop_at_eos; a row that stopped early holds `pad_id` where it
    was still masked after its stop). `stats`, if given, counts the model calls ("full_steps",
    "window_steps"). `trace`, for tests and debugging only, receives a host copy of the whole
    [rows, P + G] sequence after every step (a host read per step).

    Host reads: none inside the loop for the fixed schedule without early stop; otherwise one [2]
    int32 per step (is every row done, is the open block done) to end a block or the decoding early.
    """
    if shift_logits and any(len(p) == 0 for p in prompts):
        raise ValueError("generate: an empty prompt cannot be decoded with shift_logits (the first token "
                         "would have no predecessor); give at least one prompt token")
    from model.kv_cache import KVRecorder, KVWindow

    device = torch.device(device) if device is not None else next(model.parameters()).device
    g = cfg.max_new_tokens
    ids, seg, pos, p_len = layout(prompts, g, mask_id=mask_id, pad_id=pad_id, prompt_len=prompt_len, rows=rows)
    dev = lambda a, dtype: torch.as_tensor(a, dtype=dtype).to(device)  # noqa: E731
    x = dev(ids, torch.int64)
    segment_ids, position_ids = dev(seg, torch.int32), dev(pos, torch.int32)
    n_reveals = dev(np.asarray([n for _, _, n in cfg.schedule()], dtype=np.int32), torch.int32)
    seed = dev([_i32(cfg.seed)], torch.int32)
    vocab_bias = mask_bias(model, mask_id, device)
    done = dev(np.zeros(len(ids), dtype=bool), torch.bool)
    stop_tensor = dev(list(stops), torch.int64) if cfg.stop_at_eos and stops else None
    early = cfg.parallel or stop_tensor is not None  # may a block or the decoding end before its schedule?
    num_layers = model.config.num_hidden_layers if cfg.cache != "none" else 0
    lead = 1 if shift_logits else 0
    common = dict(prompt_len=p_len, gen_len=g, cfg=cfg, mask_id=mask_id, shift=shift_logits)
    counts = {"full_steps": 0, "window_steps": 0}
    xla = _is_xla(device)
    was_training = model.training
    model.eval()
    try:
        if xla:
            from train import runtime

            runtime.sync()  # the inputs become device data of the step graph, not part of it
        first = 0
        finished = False
        for start, end, reveals in cfg.block_plan():
            # [1], not 0-d: torch_xla turns 0-d transfers of special values (0, 1) into graph constants,
            # which would make the first block's graph differ from the rest
            counter = dev([first], torch.int32)
            first += len(reveals)
            block_offsets = dev(np.arange(start, end), torch.int64)
            recorder, window = None, None
            if cfg.cache != "none":
                recorder = KVRecorder(num_layers)
                last = p_len + (end if cfg.cache == "dual" else g)
                window = dev(np.arange(p_len + start - lead, last), torch.int64)
            for i in range(len(reveals)):
                cached = recorder is not None and i > 0
                kv = KVWindow(recorder.keys, recorder.values, segment_ids, window) if cached else recorder
                with autocast():
                    x, counter, done, flags = _step(model, x, segment_ids, position_ids, n_reveals, counter, seed,
                                                    vocab_bias, done, stop_tensor, block_offsets, kv,
                                                    window if cached else None, **common)
                counts["window_steps" if cached else "full_steps"] += 1
                every_row_done, block_done = end_step(x, flags, xla=xla, trace=trace, read_flags=early)
                finished = every_row_done
                if every_row_done or block_done:
                    break
            if finished:
                break
        out = x.cpu().numpy()
    finally:
        model.train(was_training)
    add_counts(stats, counts)
    region = out[: len(prompts), p_len:]
    region[region == mask_id] = pad_id  # only rows that stopped early keep masks (after their stop)
    return region


def _vocab_size(model) -> int:
    weight = getattr(model, "lm_head_weight", None)
    if weight is not None:
        return int(weight.shape[0])
    return int(model.config.vocab_size)


def mask_bias(model, mask_id: int, device) -> torch.Tensor:
    """[vocab] fp32 added to every step's logits: -inf at MASK (a step never "reveals" a MASK), else 0."""
    vocab = _vocab_size(model)
    bias = torch.zeros(vocab, dtype=torch.float32)
    if mask_id < vocab:
        bias[mask_id] = float("-inf")
    return bias.to(device)


def end_step(x, flags, *, xla: bool, trace: list | None, read_flags: bool = True) -> tuple[bool, bool]:
    """After a decoding step: run its graph on XLA (the recorded keys and values too: they are live
    tensors), keep a host copy of the sequence for `trace`, and read its [2] flags (every row done, the
    block has no masks left), one host read; (False, False) without reading when read_flags is off."""
    if xla:
        from train import runtime

        runtime.sync()
    if trace is not None:
        trace.append(x.cpu().numpy())
    if not read_flags:
        return False, False
    every_row_done, block_done = flags.cpu().tolist()
    return bool(every_row_done), bool(block_done)


def add_counts(stats: dict | None, counts: dict[str, int]) -> None:
    """Adds a generation's step counts into the caller's `stats` (None: not wanted)."""
    if stats is not None:
        for key, value in counts.items():
            stats[key] = stats.get(key, 0) + value


def stop_ids(tokenizer) -> tuple[int, ...]:
    return tuple(i for i in (tokenizer.im_end_id, tokenizer.eos_id) if i is not None)


def cut_at_stop(ids: Sequence[int], stops: Sequence[int]) -> list[int]:
    """The tokens before the first stop token (all of them if none)."""
    out = []
    for i in ids:
        if int(i) in stops:
            break
        out.append(int(i))
    return out


def generate(model, tokenizer, prompts: Sequence[Sequence[int]], cfg: GenerationConfig, *, diffusion,
             device=None, prompt_len: int | None = None,
             autocast: Callable[[], Any] = contextlib.nullcontext, progress: bool = False,
             stats: dict | None = None) -> list[str]:
    """Answers (decoded up to the first <|im_end|>/EOS) for prompt id lists, `cfg.batch_size` at a time.
    `diffusion` (model.diffusion.DiffusionConfig, e.g. from the checkpoint) supplies the mask token
    and the shift_logits convention the model was trained with. Every batch is padded to the same
    shape (`prompt_len`, default: the longest prompt rounded up; rows: at most batch_size, the prompts
    spread evenly over the fewest batches), so a whole call compiles one graph per kind of step.

    progress: a progress bar over the prompts on stderr (a terminal only). stats, if given, receives
    prompts, answer_tokens (answers' tokens before their stop), seconds, tokens_per_s and the model
    calls (full_steps, window_steps)."""
    if not prompts:
        return []
    import time

    longest = max(len(p) for p in prompts)
    p_len = prompt_len or -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    # as few batches as batch_size allows, evenly filled (100 prompts at 64: 2 x 50, not 64 + 36 padded)
    batches = -(-len(prompts) // cfg.batch_size)
    rows = -(-len(prompts) // batches)
    stops = stop_ids(tokenizer)
    answers: list[str] = []
    counts: dict = {}
    tokens = 0
    began = time.perf_counter()
    bar = progress_bar(len(prompts)) if progress else None
    for i in range(0, len(prompts), rows):
        chunk = prompts[i:i + rows]
        if getattr(diffusion, "objective", "mdlm") == "bd3lm":  # block by block over an exact cache
            from train.block_decode import generate_ids_blockwise

            region = generate_ids_blockwise(model, chunk, cfg, block_size=diffusion.block_size,
                                            mask_id=diffusion.mask_token_id, pad_id=tokenizer.pad_id,
                                            shift_logits=diffusion.shift_logits, device=device, rows=rows,
                                            stops=stops, autocast=autocast, stats=counts)
        else:
            region = generate_ids(model, chunk, cfg, mask_id=diffusion.mask_token_id, pad_id=tokenizer.pad_id,
                                  shift_logits=diffusion.shift_logits, device=device, prompt_len=p_len,
                                  rows=rows, stops=stops, autocast=autocast, stats=counts)
        cut = [cut_at_stop(r, stops) for r in region]
        tokens += sum(len(c) for c in cut)
        answers.extend(tokenizer.decode(c) for c in cut)
        if bar is not None:
            bar.update(len(chunk))
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - began):.1f} tokens/s")
    if bar is not None:
        bar.close()
    if stats is not None:
        seconds = time.perf_counter() - began
        stats.update(counts, prompts=len(prompts), answer_tokens=tokens, seconds=seconds,
                     tokens_per_s=tokens / seconds if seconds > 0 else 0.0)
    return answers


def progress_bar(total: int, *, unit: str = "prompt", desc: str | None = None):
    """A tqdm bar on stderr when it is a terminal; None elsewhere (logs get a summary line only)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True)


# ---- checkpoints ---------------------------------------------------------------------------------

@dataclass
class Loaded:
    """A checkpoint ready for inference."""

    path: Path
    step: int
    cfg: Any  # the run's resolved config (DictConfig)
    tokenizer: Any
    model: torch.nn.Module
    diffusion: Any  # model.diffusion.DiffusionConfig
    generation: GenerationConfig  # the run's `generation:` section (defaults if it had none)
    device: torch.device


def find_checkpoint(path: str | Path) -> Path:
    """A step folder, a checkpoints folder (its `latest`) or a run's output_dir (its checkpoints/latest)."""
    from train.checkpoint import STATE_FILE, CheckpointError, list_checkpoints, resolve_checkpoint

    p = Path(path)
    if (p / STATE_FILE).is_file():
        return p
    for root in (p, p / "checkpoints"):
        if (root / "latest").is_file() or list_checkpoints(root):
            return resolve_checkpoint(root, "latest")
    raise CheckpointError(f"{p}: no checkpoint here (expected a step-N folder with {STATE_FILE}, a checkpoints "
                          f"folder, or a run's output_dir)")


def load_for_inference(path: str | Path, device=None) -> Loaded:
    """Rebuild tokenizer, model (weights from the checkpoint) and the diffusion/generation settings
    from the config saved in the checkpoint."""
    from omegaconf import OmegaConf

    from train import checkpoint as ckpt
    from train import runtime
    from train.build import build_model, build_tokenizer, diffusion_config

    device = device or runtime.xla_device()
    found = find_checkpoint(path)
    loaded = ckpt.load_checkpoint(found, with_optimizer=False)
    saved = loaded.trainer_state.get("config")
    if not saved:
        raise ckpt.CheckpointError(f"{found}: trainer_state.json holds no 'config'; cannot rebuild the model")
    cfg = OmegaConf.create(saved)
    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, tokenizer, device)
    ckpt.load_model_weights(model, loaded.model_state, str(found))
    model.eval()
    if _is_xla(device):
        runtime.sync()
    return Loaded(path=found, step=loaded.step, cfg=cfg, tokenizer=tokenizer, model=model,
                  diffusion=diffusion_config(cfg, tokenizer),
                  generation=GenerationConfig.from_config(cfg.get("generation")), device=device)


# ---- command line --------------------------------------------------------------------------------

def add_sampler_args(parser: argparse.ArgumentParser) -> None:
    """Sampler flags shared by train.generate and train.evaluate; unset = the checkpoint's config."""
    g = parser.add_argument_group("sampler (default: the checkpoint's generation: section)")
    g.add_argument("--steps", type=int, help="denoising steps in total (default: max_new_tokens)")
    g.add_argument("--max-new-tokens", type=int, help="length of the generation region")
    g.add_argument("--block-length", type=int, help="semi-autoregressive block size")
    g.add_argument("--remasking", choices=REMASKING, help="confidence rule for what to reveal")
    g.add_argument("--temperature", type=float, help="0 = greedy; > 0 = sampling")
    g.add_argument("--top-p", type=float, help="nucleus filtering (1 = off)")
    g.add_argument("--top-k", type=int, help="top-k filtering (0 = off)")
    g.add_argument("--seed", type=int, help="noise seed")
    g.add_argument("--batch-size", type=int, help="prompts per generation call")
    g.add_argument("--threshold", type=float, help="parallel unmasking: also reveal every score above this")
    g.add_argument("--factor", type=float, help="parallel unmasking by Fast-dLLM's factor rule")
    g.add_argument("--cache", choices=CACHE_MODES, help="block-wise key/value cache: none, prefix or dual")
    g.add_argument("--no-stop-at-eos", dest="stop_at_eos", action="store_false", default=None,
                   help="decode every position even after a row's answer has ended")


def sampler_from_args(base: GenerationConfig, args: argparse.Namespace) -> GenerationConfig:
    changes = {k: getattr(args, k) for k in ("steps", "max_new_tokens", "block_length", "remasking",
                                             "temperature", "top_p", "top_k", "seed", "batch_size",
                                             "threshold", "factor", "cache", "stop_at_eos")}
    changes = {k: v for k, v in changes.items() if v is not None}
    if "max_new_tokens" in changes and "steps" not in changes and base.steps is not None:
        changes["steps"] = None  # a new region length with the old step count is rarely what was meant
    return replace(base, **changes)


def read_prompts_file(path: str) -> list[str | list[dict]]:
    """.txt: one prompt per non-empty line. .jsonl/.json: per record a string, {"prompt": str} or
    {"messages": [{"role", "content"}, ...]} (a trailing assistant turn is dropped)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--prompts-file {p}: no such file")
    text = p.read_text(encoding="utf-8")
    if p.suffix not in (".jsonl", ".json"):
        return [line for line in text.splitlines() if line.strip()]
    if p.suffix == ".json":
        records = [(i + 1, r) for i, r in enumerate(json.loads(text))]
        where = "record"
    else:
        records = [(n, json.loads(line)) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        where = "line"
    out: list[str | list[dict]] = []
    for n, rec in records:
        if isinstance(rec, str):
            out.append(rec)
        elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
            out.append(rec["prompt"])
        elif isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            msgs = rec["messages"]
            if not all(isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str) for m in msgs):
                raise ValueError(f"{p} {where} {n}: field 'messages' must be a list of {{role, content}} objects")
            while msgs and msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]
            out.append([{"role": m["role"], "content": m["content"]} for m in msgs])
        else:
            raise ValueError(f"{p} {where} {n}: expected a string, {{\"prompt\": str}} or {{\"messages\": [...]}}")
    return out


def encode_prompt(prompt: str | list[dict], loaded: Loaded, raw: bool = False) -> list[int]:
    """Prompt ids as the run trained on them: the chat template of its data config (SFT), or the
    plain text (pretraining runs, or `raw`)."""
    from data import render_prompt

    if raw or loaded.cfg.training_mode == "pretrain":
        if not isinstance(prompt, str):
            raise ValueError("a raw prompt must be text, not messages")
        return loaded.tokenizer.encode(prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return render_prompt(messages, loaded.tokenizer, loaded.cfg.data.sft)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="step folder, checkpoints folder or run output_dir")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a user message (repeat for a batch)")
    src.add_argument("--prompts-file", help=".txt (a prompt per line) or .jsonl/.json")
    parser.add_argument("--raw", action="store_true", help="no chat template: continue the text as given")
    add_sampler_args(parser)
    args = parser.parse_args(argv)

    from train import runtime

    runtime.xla_device()  # before any autograd (DESIGN.md section 6)
    from train.checkpoint import CheckpointError
    from train.config import ConfigError
    from train.build import autocast_context

    try:
        prompts = args.prompt if args.prompt else read_prompts_file(args.prompts_file)
        loaded = load_for_inference(args.checkpoint)
        gen_cfg = sampler_from_args(loaded.generation, args)
        ids = [encode_prompt(p, loaded, args.raw) for p in prompts]
        stats: dict = {}
        answers = generate(loaded.model, loaded.tokenizer, ids, gen_cfg, diffusion=loaded.diffusion,
                           device=loaded.device, autocast=lambda: autocast_context(loaded.cfg),
                           progress=True, stats=stats)
    except (ConfigError, CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"checkpoint: {loaded.path} (step {loaded.step}); sampler: {gen_cfg.describe(loaded.diffusion)}")
    for prompt, answer in zip(prompts, answers):
        shown = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
        print(f"\n>>> {shown}\n{answer}")
    print(f"\n{speed_line(stats)}")
    return 0


def speed_line(stats: dict) -> str:
    """One line from generate()'s stats: answers, tokens, time, tokens/s, model calls."""
    calls = stats.get("full_steps", 0) + stats.get("window_steps", 0)
    return (f"{stats['prompts']} answers, {stats['answer_tokens']} tokens in {stats['seconds']:.1f} s "
            f"({stats['tokens_per_s']:.1f} tokens/s; {calls} model calls"
            + (f", {stats['window_steps']} on a cached window" if stats.get("window_steps") else "") + ")")


if __name__ == "__main__":
    sys.exit(main())
