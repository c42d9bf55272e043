"""Case builders, run inside the case processes of bench/harness.py (torch on the XLA device).

Each builder takes (spec, device) and returns an object with `step()` (one round of work, waited
for) and `info` (a dict: what ran, its size, the matmul FLOPs it did).

* `attention`: kernels.masked_attention forward, or forward + backward, with backend `pallas`
  (our kernel; Pallas' interpreter on CPU, Mosaic on TPU), `reference` (dense pure jnp through
  call_jax) or `naive` (kernels/naive.py: K/V repeated to every query head, a dense [B, H, L, L]
  score matrix with an additive mask; plain torch ops traced by torch_xla).
* `cross_entropy`: kernels.masked_cross_entropy, same three backends (`naive`: full [N, V] fp32
  logits, CE at every position, then masked).
* `train_step`: one full SFT step (forward, backward, clipping, AdamW update) of a model built by
  our trainer, see `train_step` below.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from bench.harness import wait_device


class Case:
    def __init__(self, step, info: dict):
        self.step = step
        self.info = info


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------


def segments(batch: int, length: int, n_segments: int) -> np.ndarray:
    """[B, L] int32: n equal packed segments per row, ids 1..n."""
    ids = np.repeat(np.arange(1, n_segments + 1, dtype=np.int32), length // n_segments)
    ids = np.concatenate([ids, np.full(length - ids.size, n_segments, np.int32)])
    return np.broadcast_to(ids, (batch, length)).copy()


def attention(spec: dict, device) -> Case:
    import kernels

    b, hq, hkv, length, d = (int(spec[k]) for k in ("B", "Hq", "Hkv", "L", "D"))
    impl, backward, causal = spec["impl"], spec["mode"] == "fwd_bwd", bool(spec.get("causal", False))
    block_sizes = spec.get("block_sizes")  # {"block_q", "block_k"} for the Pallas kernel
    dtype = getattr(torch, spec.get("dtype", "float32"))
    gen = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype).to(device)
                   for shape in ((b, hq, length, d), (b, hkv, length, d), (b, hkv, length, d),
                                 (b, hq, length, d)))
    bd_block = int(spec.get("block_diffusion") or 0)
    if bd_block:  # bd3lm's layout: the noised then the clean copy of one example per row, L = 2 x row
        from model.diffusion import block_ids

        half = length // 2
        pos = torch.arange(half, dtype=torch.int32).expand(b, half)
        one = torch.ones((b, half), dtype=torch.int32)
        seg_np = torch.cat([block_ids(one, pos, block_size=bd_block, shift=False, clean=c) for c in (False, True)],
                           1).numpy()
    else:
        seg_np = segments(b, length, int(spec["segments"]))
    seg = torch.from_numpy(seg_np).to(device)
    if backward:
        for t in (q, k, v):
            t.requires_grad_(True)
    wait_device()
    keep = {}

    def step():
        if backward:
            q.grad = k.grad = v.grad = None
            o = kernels.masked_attention(q, k, v, seg, causal=causal, backend=impl,
                                         block_sizes=block_sizes if impl == "pallas" else None,
                                         block_diffusion=bool(bd_block))
            o.backward(do)
        else:
            with torch.no_grad():
                o = kernels.masked_attention(q, k, v, seg, causal=causal, backend=impl,
                                             block_sizes=block_sizes if impl == "pallas" else None,
                                             block_diffusion=bool(bd_block))
        keep["o"] = o.detach()  # outputs stay alive until the next round, as gradients do
        wait_device()

    if impl == "pallas":
        from kernels import pallas_attention as pa

        flops = pa.attention_matmul_flops(seg_np, hq, d, causal=causal, block_sizes=block_sizes,
                                          backward=backward, block_diffusion=bool(bd_block))
    else:  # dense: QK^T, PV forward; backward naive (autograd) 4 matmuls, reference 5 (+ QK^T)
        n_mm = 2 + ((4 if impl == "naive" else 5) if backward else 0)
        flops = n_mm * 2 * b * hq * length * length * d
    return Case(step, {"suite": "attention", "impl": impl, "backend": kernels.resolve_backend(impl),
                        "mode": spec["mode"], "segments": int(spec["segments"]), "causal": causal,
                        "block_diffusion": bd_block,
                        "shape": {"B": b, "Hq": hq, "Hkv": hkv, "L": length, "D": d},
                        "block_sizes": block_sizes, "matmul_flops": int(flops)})


def cross_entropy(spec: dict, device) -> Case:
    import kernels

    n, h, v = (int(spec[k]) for k in ("N", "H", "V"))
    impl, backward = spec["impl"], spec["mode"] == "fwd_bwd"
    n_loss = int(round(float(spec["fraction"]) * n))
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn((n, h), generator=gen)
    weight = torch.randn((v, h), generator=gen) * 0.02
    targets = torch.randint(0, v, (n,), generator=gen, dtype=torch.int32)
    token_weight = torch.zeros(n)
    rows = torch.randperm(n, generator=gen)[:n_loss]
    token_weight[rows] = torch.linspace(1.0, 20.0, n_loss)  # 1/t-style weights
    hidden, weight, targets, token_weight = (x.to(device) for x in (hidden, weight, targets,
                                                                    token_weight))
    if backward:
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
    wait_device()
    block_sizes = spec.get("block_sizes") if impl == "pallas" else None
    keep = {}

    def step():
        if backward:
            hidden.grad = weight.grad = None
            loss = kernels.masked_cross_entropy(hidden, weight, targets, token_weight, backend=impl,
                                                block_sizes=block_sizes)
            loss.backward()
        else:
            with torch.no_grad():
                loss = kernels.masked_cross_entropy(hidden, weight, targets, token_weight,
                                                    backend=impl, block_sizes=block_sizes)
        keep["loss"] = loss.detach()
        wait_device()
        if "checked" not in keep:  # the loss of the first round, for a cross-backend check
            keep["checked"] = True
            return {"loss": float(keep["loss"].cpu())}
        return None

    if impl == "pallas":
        from kernels import pallas_cross_entropy as pce

        bs = pce.resolve_block_sizes(block_sizes, interpret=kernels.resolve_backend(impl) == "interpret")
        rows_run = pce.computed_rows(n, n_loss, bs)
        v_pad = -(-v // 128) * 128
        flops = (4 if backward else 1) * 2 * rows_run * h * v_pad  # backward: logits again, dW, dh
        extra = {"computed_rows": rows_run, "block_sizes": vars(bs)}
    else:
        flops = (3 if backward else 1) * 2 * n * h * v
        extra = {"computed_rows": n}
    return Case(step, {"suite": "cross_entropy", "impl": impl, "backend": kernels.resolve_backend(impl),
                        "mode": spec["mode"], "shape": {"N": n, "H": h, "V": v},
                        "loss_positions": n_loss, "matmul_flops": int(flops), **extra})


# --------------------------------------------------------------------------------------------------
# train step
# --------------------------------------------------------------------------------------------------

# model.attention_kernel / model.loss_kernel per variant
VARIANT_KERNELS = {"ours": ("pallas", "pallas"), "reference": ("reference", "reference"),
                   "seed_style": ("naive", "naive")}


def unpack_to_padded(batch: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """The seed's batch layout for the examples of a packed batch: one example per row, padded to
    the longest example in the batch (segment 1 = the example, 0 = padding; positions from 0)."""
    examples = []
    for r in range(batch["segment_ids"].shape[0]):
        seg = batch["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            idx = np.nonzero(seg == s)[0]
            examples.append((batch["input_ids"][r, idx], batch["src_mask"][r, idx]))
    longest = max(len(ids) for ids, _ in examples)
    k = len(examples)
    out = {"input_ids": np.full((k, longest), pad_id, np.int32),
           "src_mask": np.ones((k, longest), bool),
           "segment_ids": np.zeros((k, longest), np.int32),
           "position_ids": np.zeros((k, longest), np.int32)}
    for i, (ids, src) in enumerate(examples):
        n = len(ids)
        out["input_ids"][i, :n] = ids
        out["src_mask"][i, :n] = src
        out["segment_ids"][i, :n] = 1
        out["position_ids"][i, :n] = np.arange(n)
    return out


def count_examples(batch: dict[str, np.ndarray]) -> int:
    return sum(len(np.unique(row[row > 0])) for row in batch["segment_ids"])


def model_matmul_flops(config, batch: dict[str, np.ndarray], loss_positions: float) -> float:
    """Matmul FLOPs one training step of this model needs for this batch (forward + backward =
    3 x forward), counting only useful work: the layers on non-padding tokens, attention within each
    example (bidirectional), and the LM head on the loss positions. The yardstick for model FLOP
    utilisation (what a design computes beyond it, e.g. logits of every position, is overhead)."""
    h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    per_token = h * (q + 2 * kv) + q * h + 3 * h * i  # projections and MLP weights (MACs)
    seg = batch["segment_ids"]
    tokens = int((seg > 0).sum())
    pairs = 0
    for row in seg:
        _, counts = np.unique(row[row > 0], return_counts=True)
        pairs += int((counts.astype(np.int64) ** 2).sum())
    layers = config.num_hidden_layers
    forward = (2 * per_token * tokens * layers
               + 2 * 2 * config.num_attention_heads * d * pairs * layers
               + 2 * h * config.vocab_size * loss_positions)
    return 3.0 * forward


def train_overrides(spec: dict) -> list[str]:
    attn, loss = VARIANT_KERNELS[spec["variant"]]
    return [
        "model=" + spec.get("preset", "qwen3-tiny"),
        "tokenizer_name=" + spec.get("tokenizer", "qwen3"),
        f"global_batch_size={int(spec['rows'])}",
        f"data.block_size={int(spec['block_size'])}",
        f"model.attention_kernel={attn}",
        f"model.loss_kernel={loss}",
        "eval_max_batches=0",
        "generation.eval_exact_match_examples=0",
        "diffusion.full_mask_steps=0",  # a steady-state SFT step (t ~ U(eps, 1)), not the demo's warm-up
        "output_dir=" + spec.get("output_dir", "/tmp/pallas-dlm-bench"),
        *spec.get("overrides", []),
    ]


def train_step(spec: dict, device) -> Case:
    """One full SFT step of the trainer's model, optimizer and objective.

    variant `ours` / `reference`: Trainer.train_step itself (packed rows, model.attention_kernel and
    model.loss_kernel pallas / reference), fed a fixed list of the stream's first batches in turn.
    variant `seed_style`: the seed trainer's design built here from the same modules: the examples
    of those same packed batches, one per row, padded to the longest in the batch; naive kernels
    (dense additive-mask attention with repeated K/V; full-logit fp32 CE, then masked); the same
    noise law, loss, clipping, AdamW and schedule. Every variant processes the same examples, so
    the ratio of step times is the ratio of non-padding tokens/s.
    """
    from model.diffusion import draw_noise
    from train import trainer as tr
    from train.config import load_config

    cfg = load_config(train_overrides(spec))
    trainer = tr.Trainer(cfg, log=lambda *a, **k: None)
    packed = [next(trainer.stream) for _ in range(int(spec.get("batches", 1)))]
    model, diff_cfg = trainer.model, trainer.diff_cfg

    if spec["variant"] == "seed_style":
        batches = [unpack_to_padded(b, trainer.tokenizer.pad_id) for b in packed]
        cycle = itertools.cycle(range(len(batches)))
        counter = itertools.count()

        def one_step():  # the trainer's own optimizer step, on the padded batch
            batch = batches[next(cycle)]
            rows, length = batch["input_ids"].shape
            t, u = draw_noise(rows, length, tr.noise_generator(cfg.seed, next(counter)),
                              sampling_eps=diff_cfg.sampling_eps, antithetic=diff_cfg.antithetic)
            stats = tr.optimizer_step(model, trainer.optimizer, [batch], t, u, diff_cfg, cfg, device)
            trainer.scheduler.step()
            return stats
    else:
        batches = packed
        trainer.stream = itertools.cycle(batches)

        def one_step():
            stats, _ = trainer.train_step()
            trainer.step += 1  # as fit() does: the next step draws the next step's noise
            return stats

    def step():
        stats = one_step()
        wait_device()
        return {"loss": float(stats["loss"].cpu()),
                "loss_positions": float(stats["loss_positions"].cpu())}

    tokens = [int((b["segment_ids"] > 0).sum()) for b in batches]
    slots = [int(b["segment_ids"].size) for b in batches]
    info = {"suite": "train_step", "variant": spec["variant"], "preset": spec.get("preset", "qwen3-tiny"),
            "tokenizer": trainer.tokenizer.name, "vocab_size": model.config.vocab_size,
            "hidden_size": model.config.hidden_size,
            "attention_kernel": model.attention_kernel, "loss_kernel": model.loss_kernel,
            "batch_shapes": [list(b["input_ids"].shape) for b in batches],
            "examples_per_step": [count_examples(b) for b in batches],
            "tokens_per_step": float(np.mean(tokens)), "padding_share": 1.0 - sum(tokens) / sum(slots),
            "parameters": sum(p.numel() for p in model.parameters()),
            "precision": str(cfg.precision)}
    info.update(step_workload(model.config, packed, diff_cfg))
    return Case(step, info)


def step_workload(config, packed: list[dict[str, np.ndarray]], diff_cfg) -> dict:
    """maskable_per_step and model_matmul_flops of a step over these packed batches, the same for every
    design fed them. Loss positions vary with the noise; the FLOP yardstick uses the step's expected
    count (maskable positions x E[t], t ~ U(eps, 1))."""
    from model.diffusion import maskable_positions

    maskable = []
    for b in packed:
        bt = {k: torch.from_numpy(np.ascontiguousarray(x)) for k, x in b.items()}
        maskable.append(int(maskable_positions(bt, diff_cfg.shift_logits).sum()))
    expected_t = 0.5 * (1.0 + diff_cfg.sampling_eps)
    return {"maskable_per_step": float(np.mean(maskable)),
            "model_matmul_flops": float(np.mean([model_matmul_flops(config, b, expected_t * m)
                                                 for b, m in zip(packed, maskable)]))}



_Case = Case  # the name other suites first imported
