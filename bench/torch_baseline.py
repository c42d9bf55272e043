"""The strongest plain-PyTorch SFT step we could write, to measure our trainer against (bench case
builders, run inside the case processes of bench/harness.py).

What a user would write with transformers and torch alone, given our batches: Hugging Face's
`Qwen3ForCausalLM` built from the same architecture (SDPA attention), eager on the CPU, fed the same
packed rows as our trainer (the trainer's first batches: same examples, same rows, same noise law) with
a bidirectional block-diagonal mask so that packed examples do not see each other, the masked-diffusion
loss (1/t-weighted CE at the masked positions, the trainer's normaliser), gradient clipping and torch's
AdamW (fused on the CPU where torch has it, else foreach; the trainer's decay groups and
hyper-parameters; constant learning rate). Two ways to compute the loss:

* `full`: logits of every position, fp32, then CE masked by the loss weights (dllm's style);
* `select`: the LM head only at the loss positions (a boolean gather of the hidden states first).

`precision=bf16` runs forward and loss under torch.autocast("cpu", bfloat16), as our trainer's
`precision=bf16` does on XLA; parameters, gradients and optimizer state stay fp32 on both sides.

`matmul_ceiling`: one large matmul (eager torch, or XLA on the same core) in fp32 or bf16, the
machine's ceiling for the step's GFLOP/s.
"""

from __future__ import annotations

import contextlib
import itertools

import numpy as np
import torch
import torch.nn.functional as F

from bench.cases import Case, count_examples, step_workload, train_overrides
from bench.harness import wait_device


def block_diagonal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] bool, True where query and key are in the same example (bidirectional). A padding
    query (segment 0) sees only itself, so that no softmax row is empty (its output is never used)."""
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] > 0)
    eye = torch.eye(segment_ids.shape[1], dtype=torch.bool)[None]
    return (same | eye)[:, None]


def _hf_model(config, seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hf_config = Qwen3Config(**config.to_hf_config_dict())
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(hf_config)
    model.train()
    return model


def _optimizer(model, opt_cfg) -> tuple[torch.optim.Optimizer, str]:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": float(opt_cfg.weight_decay)},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=float(opt_cfg.learning_rate), betas=tuple(float(b) for b in opt_cfg.betas),
                  eps=float(opt_cfg.eps))
    try:  # torch's fused AdamW has a CPU kernel since 2.4: the fastest update it offers
        opt = torch.optim.AdamW(groups, fused=True, **kwargs)
        return opt, "fused"
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs), "foreach"


def torch_step(spec: dict, device) -> Case:
    """One plain-PyTorch SFT step (`loss` = full | select, `precision` = fp32 | bf16). `device` (the
    XLA device the harness made) is not used: everything runs eagerly on the CPU."""
    from data.pipeline import build_batch_stream
    from model.diffusion import draw_noise, loss_normaliser, loss_targets, maskable_positions, noise_batch
    from train import trainer as tr
    from train.config import load_config

    cfg = load_config(train_overrides(spec))
    tokenizer = tr.build_tokenizer(cfg)
    diff_cfg = tr.diffusion_config(cfg, tokenizer)
    config = tr.model_config(cfg, tokenizer)
    stream = build_batch_stream(cfg.data, tokenizer, training_mode=cfg.training_mode,
                                batch_size=int(cfg.global_batch_size), seed=int(cfg.seed))
    packed = [next(stream) for _ in range(int(spec.get("batches", 1)))]
    batches = [{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in b.items()} for b in packed]
    masks = [block_diagonal_mask(b["segment_ids"]) for b in batches]
    model = _hf_model(config, int(cfg.seed))
    optimizer, update = _optimizer(model, cfg.optimizer)
    mode, precision = spec["loss"], spec.get("precision", "fp32")
    if mode not in ("full", "select") or precision not in ("fp32", "bf16"):
        raise ValueError(f"torch_step: loss {mode!r} / precision {precision!r}")
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" \
        else contextlib.nullcontext
    max_norm = float(cfg.max_grad_norm or 0.0)
    # importing torch_xla replaces torch.nn.utils.clip_grad_norm_ with a per-tensor XLA version; a
    # plain-PyTorch user has torch's own (foreach on the CPU), kept by the patch as `_orig`
    clip = getattr(torch.nn.utils.clip_grad_norm_, "_orig", torch.nn.utils.clip_grad_norm_)
    cycle, counter = itertools.cycle(range(len(batches))), itertools.count()

    def step():
        i = next(cycle)
        batch = batches[i]
        ids = batch["input_ids"].long()
        rows, length = ids.shape
        t, u = draw_noise(rows, length, tr.noise_generator(cfg.seed, next(counter)),
                          sampling_eps=diff_cfg.sampling_eps, antithetic=diff_cfg.antithetic)
        maskable = maskable_positions(batch, diff_cfg.shift_logits)
        noisy, loss_mask = noise_batch(ids, maskable, t, u, diff_cfg.mask_token_id)
        targets, weight = loss_targets(ids, loss_mask, t, diff_cfg.shift_logits)
        normaliser = loss_normaliser(diff_cfg.loss_norm, maskable, loss_mask)
        with autocast():
            hidden = model.model(input_ids=noisy, attention_mask=masks[i],
                                 position_ids=batch["position_ids"].long()).last_hidden_state
            hidden, targets, weight = hidden.reshape(rows * length, -1), targets.reshape(-1), weight.reshape(-1)
            if mode == "select":
                keep = weight > 0
                hidden, targets, weight = hidden[keep], targets[keep], weight[keep]
            logits = model.lm_head(hidden).float()
            loss = (F.cross_entropy(logits, targets, reduction="none") * weight).sum() / normaliser
        loss.backward()
        if max_norm:
            clip(model.parameters(), max_norm, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": float(loss.detach()), "loss_positions": float(loss_mask.sum())}

    info = _train_info(spec, "torch-" + mode, config, packed, diff_cfg, tokenizer)
    info.update({"precision": precision, "optimizer_update": update, "attention": "sdpa",
                 "parameters": sum(p.numel() for p in model.parameters())})
    return Case(step, info)


def _train_info(spec, variant, config, packed, diff_cfg, tokenizer) -> dict:
    """What the step processes, identical for every design fed the same packed batches."""
    tokens = [int((b["segment_ids"] > 0).sum()) for b in packed]
    return {"suite": "vs_torch", "variant": variant, "preset": spec.get("preset", "qwen3-tiny"),
            "tokenizer": tokenizer.name, "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
            "batch_shapes": [list(b["input_ids"].shape) for b in packed],
            "examples_per_step": [count_examples(b) for b in packed],
            "tokens_per_step": float(np.mean(tokens)), **step_workload(config, packed, diff_cfg)}


def matmul_ceiling(spec: dict, device) -> Case:
    """C = A @ B at n x n x n (`impl` eager | xla, `dtype` fp32 | bf16): the GFLOP/s this core reaches
    on one large, well-shaped matmul."""
    n = int(spec.get("n", 2048))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    repeats = int(spec.get("repeats", 4))
    if spec["impl"] == "xla":
        a, b = a.to(device), b.to(device)

    def step():
        out = a
        for _ in range(repeats):
            out = (out @ b) * (1.0 / n)  # chained, so XLA cannot drop or merge them
        wait_device()
        return {"checksum": float(out[0, 0].float().cpu())}

    return Case(step, {"suite": "vs_torch", "impl": spec["impl"], "dtype": spec["dtype"], "n": n,
                       "flops": 2.0 * n ** 3 * repeats})
