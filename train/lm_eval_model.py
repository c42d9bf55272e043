"""Our diffusion LM as an lm-evaluation-harness model, registered as `pallas-dlm`.

    lm_eval --model pallas-dlm --model_args pretrained=outputs/run,mc_samples=32 --tasks ... [--include_path DIR]
    python -m train.evaluate --lm-eval --model_args pretrained=outputs/run --tasks ...   (the same CLI)

`pretrained` is a checkpoint (a step folder, a checkpoints folder or a run's output_dir) or a directory
written by `python -m train.export`. The other model_args are listed in `PallasDLM.__init__`.

What each request type computes:
- `loglikelihood(context, continuation)`: a diffusion LM has no left-to-right likelihood; we report its
  evidence lower bound, estimated by Monte Carlo the way LLaDA does. For a continuation of n tokens, a
  sample draws a count l in 1..n, masks l of the continuation's tokens at random, and scores
  (n / l) * (sum of the masked tokens' cross-entropy given the context and the unmasked tokens).
  The estimate is the mean over `mc_samples` samples. The counts are stratified: one uniform offset,
  then evenly spaced strata of 1..n, which cuts the variance against independent draws. So the value
  is a lower bound of the log-probability, and its noise falls as 1/sqrt(mc_samples). `is_greedy`:
  with the whole continuation masked, is every token its position's argmax?
- `loglikelihood_rolling(text)`: the same bound over lm-eval's rolling windows of the text (each token
  scored once, given up to `max_length` tokens before it), summed.
- `generate_until(context, gen_kwargs)`: our diffusion sampler (train.generate; every sampler option is
  a model_arg, and `max_gen_toks` / `temperature` / `until` from the task apply), the text cut at the first
  stop sequence.

Registration: importing this module registers the class. `lm_eval` finds it without an import of
ours through the `pallas_dlm_lm_eval.pth` hook that `make install` puts in the environment
(plugins/lm_eval_hook).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from train.code_eval import truncate_completion
from train.generate import progress_bar

# Sequence lengths and masked counts are rounded up to these multiples, so XLA compiles one scoring
# graph per bucket instead of one per request.
LENGTH_BUCKET = 32
MASKED_BUCKET = 16


@dataclass
class _Scored:
    """One scoring row: a request's tokens with some continuation positions masked."""

    request: int
    tokens: list[int]
    masked: list[int]  # positions (in tokens) that are masked and scored
    weight: float  # n / l for an ELBO sample; 0 for the greedy check row


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


@register_model("pallas-dlm")
class PallasDLM(LM):
    def __init__(self, pretrained: str, mc_samples: int = 32, batch_size: int | str = 16,
                 max_length: int | None = None, seed: int = 0, device: str | None = None,
                 progress: bool | str = True, max_batch_size: Any = None, **sampler: Any):
        """pretrained: checkpoint or export directory. mc_samples: ELBO samples per loglikelihood
        request. batch_size: scoring rows (and prompts per generation call) at a time. max_length:
        longest sequence scored (default: the model's max_position_embeddings); contexts are cut from
        the left. seed: the masks' random seed. sampler: any `generation.*` option (steps, block_length,
        remasking, threshold, factor, cache, stop_at_eos, temperature, max_new_tokens, ...).
        lm-eval's --batch_size arrives as batch_size; its --device and --max_batch_size are ignored: the
        model runs on the XLA device (a TPU, else XLA:CPU), where our kernels run."""
        super().__init__()
        from train import runtime
        from train.generate import GenerationConfig

        self._device = runtime.xla_device()  # lm-eval's --device (cuda by default) does not apply
        self.mc_samples = int(mc_samples)
        if self.mc_samples < 1:
            raise ValueError(f"pallas-dlm: mc_samples must be a positive integer, got {mc_samples!r}")
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.seed = int(seed)
        self.progress = _as_bool(progress)
        self.model, self.tokenizer, self.diffusion, base = _load(pretrained, self._device)
        self.max_length = int(max_length or self.model.config.max_position_embeddings)
        numeric = {k: _number(v) for k, v in sampler.items()}
        self.generation = GenerationConfig.from_config({**asdict(base), **numeric})
        self.pretrained = str(pretrained)

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_id)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name", type(self.tokenizer).__name__))

    def get_model_info(self) -> dict:
        return {"pretrained": self.pretrained, "mc_samples": self.mc_samples,
                "sampler": self.generation.describe()}

    # ---- loglikelihood -------------------------------------------------------------------------

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [(self.tokenizer.encode(ctx), self.tokenizer.encode(cont)) for ctx, cont in
                 (r.args for r in requests)]
        return self.score_pairs(pairs, desc="loglikelihood")

    def loglikelihood_rolling(self, requests) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        pairs, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            # lm-eval sizes windows for a causal LM's input (the last token is never fed); we feed all of
            # context + continuation, so one position less
            windows = get_rolling_token_windows(token_list=self.tokenizer.encode(text), prefix_token=self.eot_token_id,
                                                max_seq_len=self.max_length - 1, context_len=1)
            for window in windows:
                ctx, cont = make_disjoint_window(window)
                pairs.append((list(ctx), list(cont)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (value, _) in zip(owner, self.score_pairs(pairs, desc="loglikelihood_rolling")):
            totals[i] += value
        return totals

    def score_pairs(self, pairs: Sequence[tuple[list[int], list[int]]], *, desc: str = "scoring",
                    samples: int | None = None, seed: int | None = None) -> list[tuple[float, bool]]:
        """[(ELBO estimate of log p(continuation | context), is_greedy)] for token-id pairs."""
        if getattr(self.diffusion, "objective", "mdlm") == "bd3lm":
            raise NotImplementedError("pallas-dlm: loglikelihood tasks are not built for bd3lm models yet (its "
                                      "ELBO runs block by block); generate_until tasks work")
        samples = self.mc_samples if samples is None else samples
        rng = np.random.default_rng(self.seed if seed is None else seed)
        rows: list[_Scored] = []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise ValueError(f"pallas-dlm: request {i} has an empty continuation")
            if self.diffusion.shift_logits and not ctx:
                ctx = [self.eot_token_id]  # the first token needs a predecessor to be predicted from
            ctx = ctx[-max(self.max_length - len(cont), 1):]
            tokens = ctx + cont
            if len(tokens) > self.max_length:
                raise ValueError(f"pallas-dlm: request {i}: a continuation of {len(cont)} tokens does not fit "
                                 f"max_length {self.max_length}")
            n, first = len(cont), len(ctx)
            offset = rng.random()
            for k in range(samples):  # stratified counts: one offset, evenly spaced strata of 1..n
                count = min(n, 1 + int((k + offset) * n / samples))
                masked = sorted(first + rng.choice(n, size=count, replace=False))
                rows.append(_Scored(i, tokens, [int(p) for p in masked], n / count))
            rows.append(_Scored(i, tokens, list(range(first, first + n)), 0.0))
        nll = np.zeros(len(pairs))
        greedy = [True] * len(pairs)
        bar = progress_bar(len(pairs), unit="request", desc=desc) if self.progress else None
        order = sorted(range(len(rows)), key=lambda r: len(rows[r].tokens))  # similar lengths batch together
        for start in range(0, len(order), self.batch_size):
            chunk = [rows[r] for r in order[start:start + self.batch_size]]
            ce, hit = self._score_rows(chunk)
            for row, row_ce, row_hit in zip(chunk, ce, hit):
                if row.weight > 0:
                    nll[row.request] += row.weight * row_ce / samples
                else:
                    greedy[row.request] = bool(row_hit)
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [(-float(v), g) for v, g in zip(nll, greedy)]

    @torch.no_grad()
    def _score_rows(self, rows: list[_Scored]) -> tuple[list[float], list[bool]]:
        """Per row: summed cross-entropy of its masked positions, and whether every one is the argmax."""
        length = -(-max(len(r.tokens) for r in rows) // LENGTH_BUCKET) * LENGTH_BUCKET
        width = -(-max(len(r.masked) for r in rows) // MASKED_BUCKET) * MASKED_BUCKET
        b = self.batch_size
        ids = np.full((b, length), self.tokenizer.pad_id, dtype=np.int64)
        seg = np.zeros((b, length), dtype=np.int32)
        pos = np.zeros((b, length), dtype=np.int32)
        where = np.zeros((b, width), dtype=np.int64)  # hidden position predicting each scored token
        targets = np.zeros((b, width), dtype=np.int64)
        live = np.zeros((b, width), dtype=np.float32)
        shift = 1 if self.diffusion.shift_logits else 0
        for r, row in enumerate(rows):
            n = len(row.tokens)
            ids[r, :n], seg[r, :n], pos[r, :n] = row.tokens, 1, np.arange(n)
            ids[r, row.masked] = self.diffusion.mask_token_id
            where[r, :len(row.masked)] = np.asarray(row.masked) - shift
            targets[r, :len(row.masked)] = [row.tokens[p] for p in row.masked]
            live[r, :len(row.masked)] = 1.0
        dev = lambda a: torch.as_tensor(a).to(self._device)  # noqa: E731
        hidden = self.model(dev(ids), dev(seg), dev(pos))
        picked = hidden.gather(1, dev(where)[..., None].expand(-1, -1, hidden.shape[-1]))
        logits = self.model.logits(picked).float()
        logits[..., self.diffusion.mask_token_id] = float("-inf")  # a MASK is never an answer
        t = dev(targets)
        ce = torch.logsumexp(logits, -1) - logits.gather(-1, t[..., None]).squeeze(-1)
        mask = dev(live)
        row_ce = (ce * mask).sum(-1)
        row_hit = ((logits.argmax(-1) == t) | (mask == 0)).all(-1)
        row_ce, row_hit = row_ce.cpu().tolist(), row_hit.cpu().tolist()
        return row_ce[:len(rows)], row_hit[:len(rows)]

    # ---- generation ------------------------------------------------------------------------------

    def generate_until(self, requests) -> list[str]:
        from train.generate import generate

        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            _, kwargs = r.args
            groups.setdefault(_freeze(kwargs), []).append(i)
        for key, members in groups.items():
            kwargs = dict(key)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            changes: dict[str, Any] = {}
            if "max_gen_toks" in kwargs:
                changes["max_new_tokens"] = int(kwargs.pop("max_gen_toks"))
                changes["steps"] = None if self.generation.steps is None else min(
                    self.generation.steps, changes["max_new_tokens"])
            if "temperature" in kwargs:
                changes["temperature"] = float(kwargs.pop("temperature"))
            if not _as_bool(kwargs.pop("do_sample", True)):
                changes["temperature"] = 0.0
            cfg = replace(self.generation, **changes, batch_size=self.batch_size)
            if cfg.block_length is not None and cfg.block_length > cfg.max_new_tokens:
                cfg = replace(cfg, block_length=None)
            prompts = [self.tokenizer.encode(requests[i].args[0])[-(self.max_length - cfg.max_new_tokens):]
                       for i in members]
            texts = generate(self.model, self.tokenizer, prompts, cfg, diffusion=self.diffusion, device=self._device,
                             progress=self.progress)
            for i, text in zip(members, texts):
                out[i] = truncate_completion(text, until)
        return [t or "" for t in out]


def _freeze(kwargs: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in (kwargs or {}).items()))


def _number(value: Any) -> Any:
    """model_args arrive as strings or numbers; the sampler wants ints, floats, bools and None."""
    if not isinstance(value, str):
        return value
    low = value.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _load(pretrained: str, device):
    """(model, tokenizer, DiffusionConfig, GenerationConfig) from a checkpoint or an export directory."""
    from model.hf import is_hf_model_dir

    path = Path(pretrained)
    if is_hf_model_dir(path):
        from data import load_tokenizer
        from model.diffusion import DiffusionConfig
        from model.hf import load_hf_model, read_hf_config
        from train import runtime
        from train.generate import GenerationConfig

        _, raw = read_hf_config(path)
        if "mask_token_id" not in raw:
            raise ValueError(f"{path / 'config.json'}: no mask_token_id; not a pallas-dlm export (train.export)")
        model = load_hf_model(path, causal=raw.get("diffusion_attention") == "causal",
                              block_diffusion=raw.get("diffusion_objective") == "bd3lm").to(device)
        model.eval()
        if torch.device(device).type == "xla":
            runtime.sync()
        diffusion = DiffusionConfig(mask_token_id=int(raw["mask_token_id"]),
                                    shift_logits=bool(raw.get("shift_logits", True)),
                                    objective=str(raw.get("diffusion_objective", "mdlm")),
                                    block_size=int(raw.get("diffusion_block_size", 8)))
        return model, load_tokenizer(str(path)), diffusion, GenerationConfig()
    from train.generate import load_for_inference

    loaded = load_for_inference(path, device)
    return loaded.model, loaded.tokenizer, loaded.diffusion, loaded.generation
