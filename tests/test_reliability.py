"""Faults of a training run: divergence stops it without saving, loss spikes are logged, SIGTERM/SIGINT save
and stop cleanly, and the unfinished folders of interrupted saves are removed on the next start."""

import json
import math
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from train import checkpoint as ckpt
from train.config import ConfigError, load_config
from train.trainer import Trainer, TrainingDiverged

SMALL = ["global_batch_size=4", "data.block_size=64", "eval_max_batches=1", "logging_steps=1",
         "lr_scheduler.warmup_steps=0", "generation.eval_exact_match_examples=0", "diffusion.full_mask_steps=0"]


def _trainer(tmp_path, *extra, log=None):
    return Trainer(load_config(SMALL + [f"output_dir={tmp_path / 'run'}", *extra]),
                   log=(log.append if log is not None else (lambda *a, **k: None)))


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys, xla_device):
    from safetensors.torch import load_file

    from train.run import main

    out = tmp_path / "run"
    code = main(SMALL + ["optimizer.learning_rate=1e6", "max_grad_norm=0", "max_steps=30", "save_steps=1",
                         "save_total_limit=null", f"output_dir={out}"])
    err = capsys.readouterr().err.strip()
    assert code == 3 and "\n" not in err and err.startswith("error: step "), err
    bad_step = int(err.split()[2].rstrip(":"))
    kept = ckpt.list_checkpoints(out / "checkpoints")
    # every step before the bad one was saved, and nothing at or after it
    assert [int(p.name.split("-")[1]) for p in kept] == list(range(1, bad_step))
    for path in kept:
        weights = load_file(str(path / "model.safetensors"))
        assert all(torch.isfinite(w).all() for w in weights.values()), path
    if kept:
        assert (out / "checkpoints" / "latest").read_text().strip() == kept[-1].name


def test_divergence_guard_can_be_turned_off_and_rejects_bad_settings(tmp_path, xla_device):
    trainer = _trainer(tmp_path, "optimizer.learning_rate=1e6", "max_grad_norm=0", "max_steps=6",
                       "divergence.action=off")
    result = trainer.fit()  # trains on; the non-finite loss is the user's choice
    assert result.steps_done == 6 and not math.isfinite(result.step_losses[6])
    for bad, key in [("divergence.action=skip_it", "divergence.action"), ("divergence.spike_factor=0.5",
                                                                            "divergence.spike_factor")]:
        with pytest.raises(ConfigError, match=key):
            load_config([bad])


def test_a_loss_spike_is_logged():
    lines = []
    owner = types.SimpleNamespace(step=12, log=lines.append)
    recent = [1.0, 1.2, 0.9, 1.1, 1.0, 1.05]
    stats = lambda loss: {"loss": torch.tensor(loss), "grad_norm": torch.tensor(1.0)}  # noqa: E731
    Trainer._check_step(owner, stats(5.0), recent, True, 10.0)
    assert lines == []
    Trainer._check_step(owner, stats(40.0), recent, True, 10.0)
    assert len(lines) == 1 and "step 12" in lines[0] and "median" in lines[0]
    with pytest.raises(TrainingDiverged, match="step 12"):
        Trainer._check_step(owner, {"loss": torch.tensor(1.0), "grad_norm": torch.tensor(float("inf"))},
                            recent, True, 0.0)


def test_stale_folders_of_interrupted_saves_are_removed_on_start(tmp_path, xla_device):
    root = tmp_path / "run" / "checkpoints"
    stale = root / ".step-00000005.x1y2"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    lines = []
    trainer = _trainer(tmp_path, "max_steps=1", log=lines)
    assert not stale.exists() and any("interrupted save" in line for line in lines)
    assert trainer.fit().checkpoint == root / "step-00000001"


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_finishes_the_step_saves_and_exits_cleanly(tmp_path, sig):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "train.run", *SMALL, "max_steps=100000", "eval_max_batches=0",
                             f"output_dir={out}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # until a few steps have run
        steps = [json.loads(x).get("step", 0) for x in metrics.read_text().splitlines()] if metrics.exists() else []
        if steps and max(steps) >= 3:
            break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the run did not get going")
    proc.send_signal(getattr(signal, sig))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert f"stopped early by {sig}" in stdout
    latest = ckpt.resolve_checkpoint(out / "checkpoints", "latest")
    step = int(latest.name.split("-")[1])
    assert step >= 3 and f"{sig} at step {step}" in stdout
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["step"] == step


def test_an_output_dir_that_cannot_be_written_is_one_line_before_anything_is_built(tmp_path, capsys):
    from train.run import main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(SMALL + ["max_steps=1", f"output_dir={blocker / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: output_dir: cannot write to {blocker / 'run'}"), err


def test_a_failed_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, xla_device):
    # a disk that fills up at the second save: the first checkpoint stays latest, no temp folder is left
    import errno

    trainer = _trainer(tmp_path, "max_steps=1")
    first = trainer.save()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    trainer.step = 2
    with pytest.raises(ckpt.CheckpointError) as info:
        trainer.save()
    message = str(info.value)
    assert "\n" not in message and "saving step 2 failed (No space left on device)" in message
    assert f"the previous checkpoint {first.name} is kept" in message
    root = first.parent
    assert (root / "latest").read_text().strip() == first.name
    assert [p.name for p in root.iterdir() if p.name.startswith(".step-")] == []


# ---- divergence.action=skip ------------------------------------------------------------------------------

def _nan_loss_at(monkeypatch, steps):
    """The training loss of these optimizer steps (1-based; one micro-batch each) becomes NaN, and so its
    gradients; evaluation is untouched. The factor, 1.0 or NaN, is device data of shape [1]: torch_xla would
    make a 0-d 1.0 a graph constant, and the NaN step a graph of its own."""
    import model.diffusion as diffusion

    real, calls = diffusion.diffusion_loss, []

    def loss(model, batch, t, u, cfg):
        value, stats = real(model, batch, t, u, cfg)
        if model.training:
            calls.append(None)
            value = value * torch.tensor([float("nan") if len(calls) in steps else 1.0]).to(value.device)[0]
        return value, stats

    monkeypatch.setattr(diffusion, "diffusion_loss", loss)


def _flat(tree, prefix=""):
    """Every tensor of a nested dict/list (a state_dict), by path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return {k: v for key, sub in items for k, v in _flat(sub, f"{prefix}/{key}").items()}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_skip_leaves_parameters_and_optimizer_state_as_they_were_and_the_run_goes_on(tmp_path, monkeypatch,
                                                                                    xla_device, optimizer):
    import torch_xla.debug.metrics as met

    from train import runtime
    from train.checkpoint import load_checkpoint

    _nan_loss_at(monkeypatch, {2})
    lines = []
    trainer = _trainer(tmp_path, "divergence.action=skip", "max_steps=4", "save_steps=1", "save_total_limit=null",
                       f"optimizer.type={optimizer}", log=lines)
    compiles, reads = [], []
    real_step = trainer.train_step

    def step():  # compiles so far, and whether the step (traced, not yet run) read anything back to the host
        compiles.append(runtime.compile_count())
        before = (met.metric_data("TransferFromDeviceTime") or [0])[0]
        out = real_step()
        reads.append((met.metric_data("TransferFromDeviceTime") or [0])[0] - before)
        return out

    trainer.train_step = step
    result = trainer.fit()
    assert result.steps_done == 4 and result.skipped_steps == 1
    assert compiles[1] == compiles[2] == compiles[3] and reads == [0] * 4, (compiles, reads)  # one graph, no read
    assert any(line.startswith("step 2: loss nan") and "skipped" in line for line in lines), lines
    assert any("1 step(s) skipped" in line for line in lines), lines
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_steps"] for r in logged if "train/loss" in r] == [0, 1, 1, 1]

    root = tmp_path / "run" / "checkpoints"
    one, two, three = (load_checkpoint(root / f"step-0000000{s}") for s in (1, 2, 3))
    for kept in (one, two, three):  # nothing non-finite reaches a checkpoint
        assert all(torch.isfinite(t).all() for t in _flat(kept.model_state).values())
        assert all(torch.isfinite(t).all() for t in _flat(kept.optimizer_state).values())
    # step 2 applied no update: weights and optimizer state (moments, factored statistics, step counts) bit for bit
    for name, tensor in one.model_state.items():
        assert _same_bits(tensor, two.model_state[name]), name
    before, after = _flat(one.optimizer_state["state"]), _flat(two.optimizer_state["state"])
    assert sorted(before) == sorted(after) and any(k.endswith("/step") for k in before)
    for key in before:
        assert _same_bits(before[key], after[key]), key
    assert all(float(t) == 1.0 for k, t in after.items() if k.endswith("/step"))
    # ... while its batch was used up and the schedule moved on; step 3 trained again
    assert two.trainer_state["scheduler"]["last_epoch"] == 2
    assert two.trainer_state["data"] != one.trainer_state["data"]
    assert any(not torch.equal(t, three.model_state[n]) for n, t in two.model_state.items())
    assert all(float(t) == 2.0 for k, t in _flat(three.optimizer_state["state"]).items() if k.endswith("/step"))


def test_max_skips_in_a_row_stop_the_run_as_stop_does(tmp_path, monkeypatch, capsys, xla_device):
    from train.run import main

    _nan_loss_at(monkeypatch, set(range(3, 100)))
    out = tmp_path / "run"
    code = main(SMALL + ["divergence.action=skip", "divergence.max_skips=2", "max_steps=10", "save_steps=1",
                         "save_total_limit=null", f"output_dir={out}"])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 3 and "\n" not in err and err.startswith("error: step 4: loss nan"), err
    assert "2 steps in a row skipped (divergence.max_skips 2)" in err
    assert "step 3: loss nan" in captured.out and "skipped, no update applied" in captured.out
    # nothing saved at the step that stopped it; the skipped step 3 saved step 2's weights again
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == [f"step-0000000{s}" for s in (1, 2, 3)]


def test_skip_settings_are_checked():
    assert load_config(["divergence.action=skip"]).divergence.max_skips == 10
    assert load_config(["divergence.action=skip", "divergence.max_skips=3"]).divergence.max_skips == 3
    for bad in ("divergence.max_skips=0", "divergence.max_skips=-1", "divergence.max_skips=abc",
                "divergence.max_skips=null", "divergence.max_skips=2.5"):
        with pytest.raises(ConfigError) as info:
            load_config([bad])
        message = str(info.value)
        assert "\n" not in message and message.startswith("divergence.max_skips: must be a positive integer"), bad
