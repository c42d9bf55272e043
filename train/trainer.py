"""The training loop: build tokenizer, model, data, optimizer; run compiled steps; evaluate; checkpoint.

One optimizer step = `gradient_accumulation_steps` micro-batches of forward + backward, gradient clipping,
the optimizer update, then one `sync()`: torch_xla compiles that graph once per shape and reuses it.
Noise (t and the masking uniforms) for step s is drawn on the host from a generator seeded by (seed, s),
so a resumed run draws exactly what an unbroken run would have.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm.auto import tqdm

from train import checkpoint as ckpt
from train import runtime, sharding
from train.build import (  # noqa: F401  (re-exported: the names other modules and tests know)
    ARCHITECTURE_FIELDS, autocast_context, batch_to_device, build_model, build_tokenizer, default_tokenizer_name,
    diffusion_config, hf_init_dir, model_config, noise_generator, resolve_hf_init, resolve_shift_logits)
from train.config import check_batch_and_mesh, check_writable, checkpoint_dir
from train.evaluate import heldout_loss  # noqa: F401  (re-exported)
from train.metrics import MetricsLogger, plot_loss_curve
from train.optim import build_optimizer, build_scheduler, init_optimizer_state

def non_padding_tokens(batch: dict[str, np.ndarray]) -> int:
    return int((batch["segment_ids"] > 0).sum())


def optimizer_step(model, optimizer, batches: list[dict[str, np.ndarray]], t_all: torch.Tensor, u_all: torch.Tensor,
                   diff_cfg, cfg: DictConfig, device) -> dict[str, torch.Tensor]:
    """One optimizer step as the device runs it: forward and backward over the micro-batches (`batches`, with
    rows of t_all/u_all in order), gradient clipping, the update, gradients cleared. Returns device stats; nothing
    is synchronised. The trainer's step and the ahead-of-time TPU compile (train/aot.py) both trace this.

    divergence.action=skip: a step whose loss or gradient norm is not finite leaves every parameter and every
    optimizer-state tensor on the device as it was, bit for bit, selected inside this same graph (no host
    read before the update). A step count an optimizer keeps on the host (ours do) has still advanced: the
    caller puts it back once the loss is on the host (`host_step_counts`, as Trainer.fit does)."""
    from model.diffusion import diffusion_loss

    model.train()
    accum = len(batches)
    rows = t_all.shape[0] // accum
    loss_total, positions = 0.0, 0.0
    for micro, batch in enumerate(batches):
        t, u = t_all[micro * rows:(micro + 1) * rows], u_all[micro * rows:(micro + 1) * rows]
        inputs = {**batch_to_device(batch, device), "t": sharding.to_device(t, device),
                  "u": sharding.to_device(u, device)}
        if micro > 0 and device.type == "xla":
            # Micro-batch k starts after k-1's backward: its inputs pass one optimization barrier with the
            # gradients so far. Left free, XLA overlaps the micro-batches and keeps each one's saved
            # activations at once (Qwen3-1.7B pretraining, 4 x 8 rows of 2,048 per v5e chip: 19.3 GiB).
            _sequence_after([p.grad for p in model.parameters() if p.grad is not None], inputs)
        t_dev, u_dev = inputs.pop("t"), inputs.pop("u")
        with autocast_context(cfg):
            loss, stats = diffusion_loss(model, inputs, t_dev, u_dev, diff_cfg)
        (loss / accum).backward()
        loss_total = loss_total + loss.detach() / accum
        positions = positions + stats["num_loss_positions"]
    if cfg.max_grad_norm:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg.max_grad_norm))
    else:
        grad_norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None))
    guard = skip_nonfinite(cfg)
    if guard:
        # Memory: the pre-step value of every parameter and state tensor stays alive until the select below
        # (AdamW: three times the parameters' bytes more at the update; the update cannot be in place).
        init_optimizer_state(optimizer)  # state made inside step() would have no "before" (ours exists already)
        before = [t.detach().clone() for t in _device_state(optimizer)]
    optimizer.step()
    if guard:
        finite = torch.isfinite(loss_total) & torch.isfinite(grad_norm)
        after = _device_state(optimizer)
        assert len(after) == len(before), "divergence.action=skip: the optimizer step added state tensors"
        with torch.no_grad():
            for tensor, old in zip(after, before):
                tensor.copy_(torch.where(finite, tensor, old))
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_total, "grad_norm": grad_norm, "loss_positions": positions}


def skip_nonfinite(cfg: DictConfig) -> bool:
    return (cfg.get("divergence") or {}).get("action", "stop") == "skip"


def _device_state(optimizer) -> list[torch.Tensor]:
    """Every parameter and every optimizer-state tensor held on its parameter's device, in a fixed order."""
    out = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param) or {}
            out += [param] + [state[k] for k in sorted(state)
                              if isinstance(state[k], torch.Tensor) and state[k].device == param.device]
    return out


def host_step_counts(optimizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tensor, copy) of each optimizer-state tensor kept on the host beside a parameter on another device
    (our optimizers' step counts); copying back undoes a skipped step's count."""
    return [(t, t.clone()) for group in optimizer.param_groups for p in group["params"]
            for t in (optimizer.state.get(p) or {}).values() if isinstance(t, torch.Tensor) and t.device != p.device]


def _sequence_after(before: list[torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    """Make the tensors of `after` depend on those of `before` (one XLA optimization barrier over both,
    in place), so that nothing computed from `after` can be scheduled before `before` is complete."""
    import torch_xla.core.xla_model as xm

    names = list(after)
    tensors = before + [after[n] for n in names]
    xm.optimization_barrier_(tensors)
    after.update(zip(names, tensors[len(before):]))


@dataclass
class RunResult:
    steps_done: int
    initial_eval: dict = field(default_factory=dict)
    final_eval: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    total_seconds: float = 0.0
    step_losses: dict[int, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    output_dir: Path | None = None
    stopped_by: str | None = None  # the signal that ended the run early (SIGTERM, SIGINT), if one did
    skipped_steps: int = 0  # steps with a non-finite loss or gradient norm that applied no update (action=skip)


class TrainingDiverged(RuntimeError):
    """A step's loss or gradient norm is not finite (divergence.action=stop), or divergence.max_skips steps in a
    row were (action=skip); nothing was saved after it."""


# How many previous steps' losses the spike warning compares against (their median).
SPIKE_WINDOW = 50


class StopSignals:
    """SIGTERM and SIGINT ask the loop to stop after the current step (it then saves and returns); a
    second signal of either kind stops at once, as the default handlers would. Restored on exit."""

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():  # handlers live on the main thread
            return self
        for name in self.SIGNALS:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        import signal

        name = signal.Signals(signum).name
        if self.received is not None:  # the second one: give up at once
            raise KeyboardInterrupt(f"{name} again: stopping without a save")
        self.received = name

    def __exit__(self, *exc):
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class Trainer:
    def __init__(self, cfg: DictConfig, *, log=print):
        from data import build_batch_stream, build_eval_batches

        self.cfg = cfg
        self.log = log
        check_writable(cfg)
        self.micro_rows = check_batch_and_mesh(cfg, runtime.device_count())
        # A mesh of several devices: SPMD (train/sharding.py), switched on before the device exists.
        self.mesh = sharding.setup_mesh(cfg)
        self.device = runtime.xla_device()
        resolve_hf_init(cfg, log)  # init_from=<HF dir>: architecture and tokenizer from the directory
        with open_dict(cfg):  # recorded resolved, so checkpoints, generation and export agree with training
            cfg.diffusion.shift_logits = resolve_shift_logits(cfg)
        self.tokenizer = build_tokenizer(cfg)
        self.diff_cfg = diffusion_config(cfg, self.tokenizer)
        self.model = build_model(cfg, self.tokenizer, self.device)
        if self.mesh is not None:
            sharding.shard_model(self.model, self.mesh)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.stream = build_batch_stream(cfg.data, self.tokenizer, training_mode=cfg.training_mode,
                                         batch_size=self.micro_rows, seed=int(cfg.seed))
        self.eval_batches = build_eval_batches(cfg.data, self.tokenizer, training_mode=cfg.training_mode,
                                               batch_size=self.micro_rows)
        if cfg.eval_max_batches is not None:
            self.eval_batches = self.eval_batches[: int(cfg.eval_max_batches)]
        self._setup_exact_match()
        self.step = 0
        self.ckpt_dir = checkpoint_dir(cfg)
        for stale in ckpt.remove_stale_temps(self.ckpt_dir):
            self.log(f"removed {stale}: the unfinished folder of an interrupted save")
        self._restore()

    # ---- start-up -------------------------------------------------------------------------------
    def _restore(self) -> None:
        cfg = self.cfg
        if cfg.init_from and hf_init_dir(cfg) is not None:
            self._load_hf_weights(hf_init_dir(cfg))
        elif cfg.init_from:
            loaded = ckpt.load_checkpoint(cfg.init_from, with_optimizer=False, log=self.log)
            ckpt.load_model_weights(self.model, loaded.model_state, str(loaded.path))
            self.log(f"init_from: weights of {loaded.path} (step {loaded.step}); fresh optimizer, schedule, step")
        elif cfg.resume_from_checkpoint is not None:
            # verified against its manifest; `latest` falls back past damaged ones, logging each
            path = ckpt.resolve_checkpoint(self.ckpt_dir, cfg.resume_from_checkpoint, log=self.log)
            if self.mesh is not None and ckpt.is_sharded_checkpoint(path) and self._optimizer_state_ready():
                # Each device reads its own pieces, whatever mesh wrote them.
                loaded = ckpt.load_sharded_into(path, self.model, self.optimizer)
            else:
                loaded = ckpt.load_checkpoint(path, log=None)  # resolve_checkpoint logged any warning
                ckpt.load_model_weights(self.model, loaded.model_state, str(path))
                if loaded.optimizer_state is not None:
                    ckpt.load_optimizer_state(self.optimizer, loaded.optimizer_state, str(path))
                else:  # saved without one (a manifest would have caught a deleted optimizer.pt)
                    self.log(f"warning: {path} holds no optimizer state; the optimizer starts fresh")
                loaded = loaded.trainer_state
            self.scheduler.load_state_dict(loaded["scheduler"])
            self.stream.load_state_dict(loaded["data"])
            self.step = int(loaded["step"])
            self.log(f"resumed from {path} at step {self.step}")
        init_optimizer_state(self.optimizer)  # after a resume this finds the loaded state and does nothing
        if self.mesh is not None:  # loaded weights arrive replicated; state follows its parameter
            sharding.shard_model(self.model, self.mesh)
            sharding.shard_optimizer_state(self.optimizer, self.model, self.mesh)
        runtime.sync()  # materialise weights and state as device data, so they are inputs of the step graph

    def _optimizer_state_ready(self) -> bool:
        """Create (and shard) the optimizer state a sharded checkpoint is loaded into in place; False
        for optimizers whose state only exists after a step (then it is read on the host)."""
        init_optimizer_state(self.optimizer)
        sharding.shard_optimizer_state(self.optimizer, self.model, self.mesh)
        return all(self.optimizer.state.get(p) for g in self.optimizer.param_groups for p in g["params"])

    def _load_hf_weights(self, root: Path) -> None:
        """Weights of a Hugging Face Qwen3 directory (safetensors only), checked tensor by tensor."""
        from model.hf import HFCheckpointError, load_hf_state_dict, read_hf_config

        config, mask = self.model.config, self.diff_cfg.mask_token_id
        if not 0 <= mask < config.vocab_size:
            raise ckpt.CheckpointError(f"init_from: mask token id {mask} lies outside the {config.vocab_size}-row "
                                       f"vocabulary of {root / 'config.json'}; resizing is not supported")
        try:
            state = load_hf_state_dict(root, config)
            _, raw = read_hf_config(root)
        except HFCheckpointError as err:
            raise ckpt.CheckpointError(f"init_from: {err}") from None
        stored = sorted({str(t.dtype).removeprefix("torch.") for t in state.values()})
        ckpt.load_model_weights(self.model, state, str(root))
        self.log(f"init_from: {len(state)} tensors ({'/'.join(stored)}) from {root}; fresh optimizer, schedule, step")
        self.log(f"init_from: mask token id {mask} lies inside the {config.vocab_size}-row vocabulary: no resize, "
                 f"its embedding row is used as loaded")
        # An earlier export records the diffusion settings it was trained with; say so when this run differs.
        for key, ours in (("mask_token_id", mask), ("shift_logits", self.diff_cfg.shift_logits)):
            if key in raw and raw[key] != ours:
                self.log(f"init_from: warning: {root / 'config.json'} was trained with {key}={raw[key]!r}, "
                         f"this run uses {ours!r}")

    def _trainer_state(self) -> dict:
        return {
            "scheduler": self.scheduler.state_dict(),  # JSON-safe: our lr lambdas are plain functions (saved as None)
            "data": self.stream.state_dict(),
            "rng": {"seed": int(self.cfg.seed),
                    "noise": "t and masking uniforms of each step drawn from SeedSequence([seed, step])"},
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def save(self) -> Path:
        return ckpt.save_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizer,
                                    self._trainer_state(), keep=self.cfg.save_total_limit,
                                    sharded=self.mesh is not None)

    # ---- one optimizer step --------------------------------------------------------------------
    def train_step(self) -> tuple[dict[str, torch.Tensor], int]:
        """Run step `self.step` (not yet synchronised); returns device stats and host token count."""
        from model.diffusion import draw_noise

        cfg, accum = self.cfg, int(self.cfg.gradient_accumulation_steps)
        # Noise for the step's whole batch, then one slice per micro-batch: accumulating k micro-batches
        # sees the same rows and the same noise as one batch k times larger.
        rows, length = self.micro_rows, int(cfg.data.block_size)
        generator = noise_generator(cfg.seed, self.step)
        t_all, u_all = draw_noise(rows * accum, length, generator,
                                  sampling_eps=self.diff_cfg.sampling_eps, antithetic=self.diff_cfg.antithetic,
                                  full_mask=self.step < self.diff_cfg.full_mask_steps)
        batches = [next(self.stream) for _ in range(accum)]
        if self.diff_cfg.masking is not None:  # prefix/truncate/span schedules: host data and u, drawn after t, u
            from model.masking import apply_masking_to_step

            batches, u_all = apply_masking_to_step(batches, u_all, generator, self.step, self.diff_cfg.masking,
                                                   shift_logits=self.diff_cfg.shift_logits,
                                                   pad_id=getattr(self.tokenizer, "pad_id", None))
        stats = optimizer_step(self.model, self.optimizer, batches, t_all, u_all, self.diff_cfg, cfg, self.device)
        self.scheduler.step()
        return stats, sum(non_padding_tokens(b) for b in batches)

    def _setup_exact_match(self) -> None:
        """Sampler settings (checked now, so a bad generation.* key fails before training) and the
        held-out examples scored by exact match (generation.eval_exact_match_examples; 0 = off)."""
        from data import load_eval_examples
        from train.generate import GenerationConfig

        gen = self.cfg.get("generation")
        self.gen_cfg = GenerationConfig.from_config(gen)
        n = int(gen.get("eval_exact_match_examples") or 0) if gen is not None else 0
        self.em_examples = (load_eval_examples(self.cfg.data, self.tokenizer, max_examples=n,
                                               training_mode=self.cfg.training_mode) if n > 0 else [])
        self.generations: list[tuple[str, str, str]] = []  # (prompt, answer, reference) of the last evaluation

    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        result = heldout_loss(self.model, self.eval_batches, self.diff_cfg, self.device,
                              autocast=lambda: autocast_context(self.cfg))
        if self.em_examples:
            from train.evaluate import exact_match

            # every call pads to the same shape: one compiled sampler step for the whole run
            result["eval/exact_match"], self.generations = exact_match(
                self.model, self.tokenizer, self.em_examples, self.gen_cfg, self.device,
                diffusion=self.diff_cfg, autocast=lambda: autocast_context(self.cfg))
        self.model.train()
        return result

    def _report_exact_match(self, before: dict, after: dict) -> None:
        """Held-out exact match before -> after, and a few answers next to their references."""
        from train.evaluate import format_examples, is_match

        if "eval/exact_match" not in after:
            return
        first = f"{before['eval/exact_match']:.1%} -> " if "eval/exact_match" in before else ""
        self.log(f"held-out exact match: {first}{after['eval/exact_match']:.1%} "
                 f"({len(self.em_examples)} examples; sampler: {self.gen_cfg.describe(self.diff_cfg)})")
        show = int(self.cfg.generation.get("eval_show_examples", 5) or 0)
        for line in format_examples(self.generations, show):
            self.log(line)
        path = Path(self.cfg.output_dir) / "generations.jsonl"
        with open(path, "w") as f:  # every scored answer, for a closer look than the few printed
            for prompt, answer, reference in self.generations:
                f.write(json.dumps({"prompt": prompt, "answer": answer, "reference": reference,
                                    "match": is_match(answer, reference)}) + "\n")
        self.log(f"all {len(self.generations)} answers: {path}")

    # ---- the loop --------------------------------------------------------------------------------
    def fit(self) -> RunResult:
        cfg = self.cfg
        start = time.perf_counter()
        out = Path(cfg.output_dir)
        metrics = MetricsLogger(str(out), cfg, append=self.step > 0)
        self.log(self.stream.format_summary())
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(f"model {cfg.model.preset}: {n_params / 1e6:.2f}M parameters, vocab {self.model.config.vocab_size}, "
                 f"tokenizer {self.tokenizer.name}, device {runtime.device_kind()} ({sharding.describe(self.mesh)}), "
                 f"{cfg.global_batch_size} rows x {cfg.data.block_size} tokens per step")
        result = RunResult(steps_done=self.step, output_dir=out)
        trained = int(cfg.max_steps) > 0  # max_steps=0 is an import: nothing trained, nothing to evaluate
        result.initial_eval = self.evaluate() if trained else {}
        if result.initial_eval:
            metrics.log(self.step, result.initial_eval)
        if "eval/loss" in result.initial_eval:
            self.log(f"held-out loss before training: {result.initial_eval['eval/loss']:.4f} "
                     f"(masked-token CE {result.initial_eval['eval/masked_ce']:.4f})")
        if "eval/exact_match" in result.initial_eval:
            self.log(f"held-out exact match before training: {result.initial_eval['eval/exact_match']:.1%} "
                     f"({len(self.em_examples)} examples)")

        pending: list[tuple[int, dict[str, torch.Tensor], int]] = []
        window_start, train_start = time.perf_counter(), time.perf_counter()
        bar = tqdm(total=int(cfg.max_steps), initial=self.step, desc="train", dynamic_ncols=True,
                   disable=None)
        guard = cfg.get("divergence") or {}
        check = guard.get("action", "stop") != "off"
        spike = float(guard.get("spike_factor", 0) or 0)
        max_skips = int(guard.get("max_skips", 10)) if skip_nonfinite(cfg) else None
        self.skipped_steps, self.skips_in_row = 0, 0
        recent: list[float] = []
        signals = StopSignals()
        with signals:
            while self.step < cfg.max_steps and signals.received is None:
                lr = self.scheduler.get_last_lr()[0]
                counts = host_step_counts(self.optimizer) if max_skips else []
                stats, tokens = self.train_step()
                runtime.sync()
                self.step += 1
                if check or spike:  # two scalars to the host per step, already computed by the sync above
                    if self._check_step(stats, recent, check, spike, max_skips=max_skips):
                        for count, old in counts:  # the device state was kept in the step's graph
                            count.copy_(old)
                pending.append((self.step, stats, tokens))
                bar.update(1)
                last = self.step == cfg.max_steps or signals.received is not None
                self._after_step(cfg, metrics, result, pending, bar, lr, last, window_start)
                if not pending:
                    window_start = time.perf_counter()
        bar.close()
        result.train_seconds = time.perf_counter() - train_start
        result.stopped_by = signals.received
        result.skipped_steps = self.skipped_steps
        if max_skips:
            self.log(f"divergence.action=skip: {self.skipped_steps} step(s) skipped in this run (non-finite loss or "
                     f"gradient norm; no update applied)")
        if result.stopped_by is not None:
            self.log(f"{result.stopped_by} at step {self.step}: saving a checkpoint and stopping")
        elif trained:
            result.final_eval = self.evaluate()
            if result.final_eval:
                metrics.log(self.step, result.final_eval)
            self._report_exact_match(result.initial_eval, result.final_eval)
        result.checkpoint = self.save()
        if not trained:
            self.log(f"max_steps=0: wrote {result.checkpoint} (the initial weights)")
        result.steps_done = self.step
        metrics.close()
        if trained:
            plot_loss_curve(metrics.jsonl_path, out / "loss_curve.png")
        result.total_seconds = time.perf_counter() - start
        return result

    def _check_step(self, stats: dict, recent: list[float], check: bool, spike: float,
                    max_skips: int | None = None) -> bool:
        """The divergence guard on the step just run (self.step): on a non-finite loss or gradient norm,
        stop before anything is saved (max_skips None: divergence.action=stop), or count the step, which
        applied no update, and say so (action=skip; True), stopping at max_skips such steps in a row; warn
        on a loss spike."""
        loss, norm = float(stats["loss"].item()), float(stats["grad_norm"].item())
        if check and max_skips is not None:
            if math.isfinite(loss) and math.isfinite(norm):
                self.skips_in_row = 0
            else:
                self.skipped_steps += 1
                self.skips_in_row += 1
                if self.skips_in_row >= max_skips:
                    raise TrainingDiverged(
                        f"step {self.step}: loss {loss}, gradient norm {norm}; {self.skips_in_row} steps in a row "
                        f"skipped (divergence.max_skips {max_skips}), so the run stopped without saving (the last "
                        f"checkpoint, if any, is untouched). Lower optimizer.learning_rate or keep max_grad_norm on")
                self.log(f"step {self.step}: loss {loss}, gradient norm {norm}: skipped, no update applied "
                         f"(divergence.action=skip; {self.skips_in_row} in a row, {self.skipped_steps} in this run)")
                return True
        if check and not (math.isfinite(loss) and math.isfinite(norm)):
            raise TrainingDiverged(
                f"step {self.step}: loss {loss}, gradient norm {norm}; the run diverged and stopped without "
                f"saving (the last checkpoint, if any, is untouched). Lower optimizer.learning_rate, keep "
                f"max_grad_norm on, or set divergence.action=off to train on regardless")
        if spike and len(recent) >= 5 and loss > spike * float(np.median(recent)):
            self.log(f"warning: step {self.step}: loss {loss:.4g} is {loss / float(np.median(recent)):.1f}x the "
                     f"median of the previous {len(recent)} steps (divergence.spike_factor {spike:g})")
        recent.append(loss)
        del recent[:-SPIKE_WINDOW]
        return False

    def _after_step(self, cfg, metrics, result, pending, bar, lr, last: bool, window_start: float) -> None:
        """Logging, evaluation and periodic saves after a step; clears `pending` when it logged."""
        if self.step % cfg.logging_steps == 0 or last:
            values = [(s, {k: v.item() for k, v in st.items()}, tok) for s, st, tok in pending]
            elapsed = time.perf_counter() - window_start
            n_tokens = sum(tok for _, _, tok in values)
            losses = [v["loss"] for _, v, _ in values]
            if skip_nonfinite(cfg):  # the steps that trained: a skipped step's NaN would hide the window's loss
                losses = [x for x in losses if math.isfinite(x)] or [math.nan]
            loss = float(np.mean(losses))
            record = {
                "train/loss": loss,
                "train/ppl": math.exp(min(loss, 50.0)),
                "train/lr": lr,
                "train/grad_norm": values[-1][1]["grad_norm"],
                "train/loss_positions": float(np.mean([v["loss_positions"] for _, v, _ in values])),
                "train/step_time": elapsed / len(values),
                "train/tokens_per_s": n_tokens / max(elapsed, 1e-9),
                **({"train/skipped_steps": self.skipped_steps} if skip_nonfinite(cfg) else {}),
            }
            for s, v, _ in values:
                result.step_losses[s] = v["loss"]
            metrics.log(self.step, record)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['train/tokens_per_s']:.0f}")
            if bar.disable:  # no terminal (CI, a log file): a plain line per logging step instead
                self.log(f"step {self.step}/{cfg.max_steps}  loss {loss:.4f}  lr {lr:.2e}  "
                         f"grad_norm {record['train/grad_norm']:.3f}  step_time {record['train/step_time']:.3f}s  "
                         f"tokens/s {record['train/tokens_per_s']:.0f}")
            pending.clear()
        if cfg.eval_steps and self.step % cfg.eval_steps == 0 and not last:
            metrics.log(self.step, self.evaluate())
        if cfg.save_steps and self.step % cfg.save_steps == 0 and not last:
            self.save()
