"""Checkpoint integrity: every save writes a manifest (size and sha256 of each file) last; loading verifies it.
A damaged latest checkpoint is one line naming it and the file, and resume_from_checkpoint=latest falls back to
the newest older one that verifies; naming a damaged one by its step is a one-line error. A run killed (-9) at
random moments of its saves resumes to the same weights, bit for bit, as a run never interrupted."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train import checkpoint as ckpt


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(32, 64)
        self.b = torch.nn.Linear(64, 16, bias=False)


def _trained(seed):
    torch.manual_seed(seed)
    model = Small()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.b(model.a(torch.randn(5, 32))).sum().backward()
    opt.step()
    return model, opt


def _two_checkpoints(root):
    """step-1 and step-2 (the latest) of a tiny model, both complete."""
    model, opt = _trained(0)
    good = ckpt.save_checkpoint(root, 1, model, opt, {"marker": 1})
    model, opt = _trained(1)
    return good, ckpt.save_checkpoint(root, 2, model, opt, {"marker": 2})


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def _flip(path, n=64):
    """Invert n bytes in the middle of the file (its tensor data, past any header)."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    data[start:start + n] = bytes(b ^ 0xFF for b in data[start:start + n])
    path.write_bytes(bytes(data))


FAULTS = {  # name -> (damage the checkpoint folder, the file the error must name)
    "weights truncated to half": (lambda p: _truncate(p / "model.safetensors",
                                                      (p / "model.safetensors").stat().st_size // 2),
                                  "model.safetensors"),
    "weights truncated to 0 bytes": (lambda p: _truncate(p / "model.safetensors", 0), "model.safetensors"),
    "64 bytes flipped in the weights": (lambda p: _flip(p / "model.safetensors"), "model.safetensors"),
    "64 bytes flipped in optimizer.pt": (lambda p: _flip(p / "optimizer.pt"), "optimizer.pt"),
    "optimizer.pt deleted": (lambda p: (p / "optimizer.pt").unlink(), "optimizer.pt"),
    "optimizer.pt truncated": (lambda p: _truncate(p / "optimizer.pt", 100), "optimizer.pt"),
    "trainer_state.json truncated": (lambda p: _truncate(p / "trainer_state.json", 20), "trainer_state.json"),
    "manifest deleted": (lambda p: (p / "manifest.json").unlink(), "manifest.json"),
    "manifest truncated": (lambda p: _truncate(p / "manifest.json", 30), "manifest.json"),
}


def test_a_save_writes_a_manifest_of_every_file(tmp_path):
    _, path = _two_checkpoints(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["version"] == 1 and manifest["step"] == 2
    assert sorted(manifest["files"]) == ["model.safetensors", "optimizer.pt", "trainer_state.json"]
    for name, entry in manifest["files"].items():
        assert entry["size"] == (path / name).stat().st_size and len(entry["sha256"]) == 64
    assert json.loads((path / "trainer_state.json").read_text())["manifest"] == "manifest.json"
    assert ckpt.verify_checkpoint(path) is None
    # a file the loader would read but the save did not hash (optimizer state added to a weights-only save)
    model, _ = _trained(2)
    bare = ckpt.save_checkpoint(tmp_path, 3, model, None, {})
    assert "optimizer.pt" not in json.loads((bare / "manifest.json").read_text())["files"]
    (bare / "optimizer.pt").write_bytes((path / "optimizer.pt").read_bytes())
    assert ckpt.load_checkpoint(bare, with_optimizer=False).optimizer_state is None
    with pytest.raises(ckpt.CheckpointError, match="optimizer.pt is not listed in manifest.json"):
        ckpt.load_checkpoint(bare)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_damaged_latest_falls_back_and_naming_it_is_one_line(tmp_path, fault):
    damage, culprit = FAULTS[fault]
    good, bad = _two_checkpoints(tmp_path)
    damage(bad)
    lines = []
    assert ckpt.resolve_checkpoint(tmp_path, "latest", log=lines.append) == good
    assert len(lines) == 2, lines
    assert str(bad) in lines[0] and culprit in lines[0] and "damaged" in lines[0]
    assert str(good) in lines[1] and "verifies" in lines[1]
    assert ckpt.load_checkpoint(good).trainer_state["marker"] == 1
    for attempt in (lambda: ckpt.resolve_checkpoint(tmp_path, 2), lambda: ckpt.load_checkpoint(bad)):
        with pytest.raises(ckpt.CheckpointError) as info:
            attempt()
        message = str(info.value)
        assert "\n" not in message and str(bad) in message and culprit in message, message
    assert bad.is_dir()  # never deleted


def test_no_checkpoint_that_verifies_is_one_line(tmp_path):
    good, bad = _two_checkpoints(tmp_path)
    _truncate(bad / "model.safetensors", 0)
    _flip(good / "optimizer.pt")
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.resolve_checkpoint(tmp_path, "latest")
    message = str(info.value)
    assert "\n" not in message and "none of the 2 checkpoints" in message and "model.safetensors" in message
    assert good.is_dir() and bad.is_dir()


def test_weights_only_loads_check_only_the_weights(tmp_path):
    # init_from and export read no optimizer state: damage there does not stop them (and is not hashed)
    _, path = _two_checkpoints(tmp_path)
    _flip(path / "optimizer.pt")
    assert ckpt.load_checkpoint(path, with_optimizer=False).step == 2
    with pytest.raises(ckpt.CheckpointError, match="optimizer.pt does not match its sha256"):
        ckpt.load_checkpoint(path)


def test_checkpoints_written_before_manifests_load_with_a_warning(tmp_path):
    good, old = _two_checkpoints(tmp_path)
    (old / "manifest.json").unlink()
    state = json.loads((old / "trainer_state.json").read_text())
    del state["manifest"]  # as an earlier version wrote it
    (old / "trainer_state.json").write_text(json.dumps(state))
    lines = []
    assert ckpt.resolve_checkpoint(tmp_path, "latest", log=lines.append) == old
    assert len(lines) == 1 and "written before manifests" in lines[0] and str(old) in lines[0]
    assert ckpt.load_checkpoint(old, log=None).trainer_state["marker"] == 2
    # ... but only when its files load: raw safetensors / torch.load errors become one line naming the file
    for name, size in (("optimizer.pt", 64), ("model.safetensors", 5)):
        _truncate(old / name, size)
        with pytest.raises(ckpt.CheckpointError) as info:
            ckpt.load_checkpoint(old)
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"{old}: {name} cannot be read"), message
    lines.clear()
    assert ckpt.resolve_checkpoint(tmp_path, "latest", log=lines.append) == good
    # an unfinished save's temporary folder is never a checkpoint, with or without a manifest
    temp = tmp_path / ".step-00000003.abc"
    good.rename(temp)
    with pytest.raises(ckpt.CheckpointError, match="unfinished save"):
        ckpt.load_checkpoint(temp)


def test_pruning_never_removes_the_new_checkpoint_for_damaged_newer_ones(tmp_path):
    # resumed from step 1 past damaged steps 2 and 3, with save_total_limit=1: the new step-2 save stays
    model, opt = _trained(0)
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model, opt, {})
    for step in (2, 3):
        _truncate(tmp_path / f"step-{step:08d}" / "model.safetensors", 0)
    assert ckpt.resolve_checkpoint(tmp_path, "latest") == tmp_path / "step-00000001"
    new = ckpt.save_checkpoint(tmp_path, 2, model, opt, {}, keep=1)
    assert ckpt.resolve_checkpoint(tmp_path, "latest") == new
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    new = ckpt.save_checkpoint(tmp_path, 3, model, opt, {}, keep=1)  # replaces the damaged step-3
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000003"]
    assert ckpt.verify_checkpoint(new) is None


def test_a_sharded_checkpoint_lists_its_shard_files(tmp_path, xla_device):
    import torch_xla

    torch.manual_seed(0)
    model = Small().to(xla_device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.b(model.a(torch.randn(5, 32).to(xla_device))).sum().backward()
    opt.step()
    torch_xla.sync()
    good = ckpt.save_checkpoint(tmp_path, 1, model, opt, {}, sharded=True)
    bad = ckpt.save_checkpoint(tmp_path, 2, model, opt, {}, sharded=True)
    files = json.loads((bad / "manifest.json").read_text())["files"]
    assert {"model/.metadata", "optimizer/.metadata", "trainer_state.json"} <= set(files)
    shard = next(n for n in files if n.startswith("model/") and n.endswith(".distcp"))
    _flip(bad / shard, 16)
    lines = []
    assert ckpt.resolve_checkpoint(tmp_path, "latest", log=lines.append) == good
    assert shard in lines[0] and str(bad) in lines[0]
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"{bad}: {shard} does not match its sha256")):
        ckpt.load_checkpoint(bad)
    assert ckpt.load_checkpoint(good).step == 1


# ---- end to end: python -m train.run -------------------------------------------------------------------

SMALL = ["global_batch_size=4", "data.block_size=64", "eval_max_batches=0", "logging_steps=1",
         "lr_scheduler.warmup_steps=0", "generation.eval_exact_match_examples=0", "diffusion.full_mask_steps=0"]


def test_a_resumed_run_falls_back_past_a_damaged_checkpoint(tmp_path, capsys, xla_device):
    from train.run import main

    out = tmp_path / "run"
    args = SMALL + ["save_steps=2", "save_total_limit=null", f"output_dir={out}"]
    assert main(args + ["max_steps=4"]) == 0
    root = out / "checkpoints"
    damaged = root / "step-00000004"
    _flip(damaged / "model.safetensors")
    capsys.readouterr()
    assert main(args + ["max_steps=6", "resume_from_checkpoint=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: resume_from_checkpoint=4: ") and str(damaged) in err
    assert "model.safetensors does not match its sha256" in err
    assert main(args + ["max_steps=6", "resume_from_checkpoint=latest"]) == 0
    log = capsys.readouterr().out
    assert re.search(rf"warning: damaged checkpoint.*{re.escape(str(damaged))}: model.safetensors", log), log
    assert f"resumed from {root / 'step-00000002'} at step 2" in log
    assert ckpt.resolve_checkpoint(root, "latest") == root / "step-00000006"


def _saves_seen(root, seen):
    """Add the step of every save in progress (a `.step-N.*` temp folder) or done (step-N) to `seen`."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return
    for name in names:
        m = re.match(r"^\.?step-(\d+)", name)
        if m:
            seen.add(int(m.group(1)))


@pytest.mark.slow
def test_kill_9_during_saves_then_resume_matches_an_uninterrupted_run(tmp_path, capsys, xla_device):
    from safetensors.torch import load_file

    from train.run import main

    steps = 12
    base = SMALL + ["save_steps=1", "save_total_limit=null", f"max_steps={steps}"]
    reference = tmp_path / "reference"
    assert main(base + [f"output_dir={reference}"]) == 0
    out = tmp_path / "run"
    root = out / "checkpoints"
    rng = random.Random(20251)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # every line reaches the log before the kill
    for kill in range(3):
        extra = ["resume_from_checkpoint=latest"] if kill else []
        log_path = tmp_path / f"run-{kill}.log"
        before: set[int] = set()
        _saves_seen(root, before)  # steps saved, or left half-saved, by the runs before
        stale = [p for p in root.iterdir() if p.name.startswith(".step-")] if root.is_dir() else []
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "train.run", *base, *extra, f"output_dir={out}"],
                                    stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=Path(__file__).resolve().parents[1])
        new_saves, delay = rng.randint(1, 3), rng.uniform(0.0, 0.05)
        seen: set[int] = set()
        deadline = time.time() + 240
        while len(seen - before) < new_saves:  # until this many new saves have begun
            _saves_seen(root, seen)
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, "the run did not get to its saves"
            time.sleep(0.002)
        time.sleep(delay)  # a random moment in (or just after) that save
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        text = log_path.read_text()
        assert all(f"removed {path}" in text for path in stale), text  # what the previous kill left
        if kill:  # the checkpoint it resumed from was complete: its manifest verifies
            resumed = Path(re.search(r"resumed from (\S+) at step", text).group(1))
            assert ckpt.verify_checkpoint(resumed) is None
    capsys.readouterr()
    stale = [p for p in root.iterdir() if p.name.startswith(".step-")]
    assert main(base + ["resume_from_checkpoint=latest", f"output_dir={out}"]) == 0
    text = capsys.readouterr().out
    for path in stale:
        assert f"removed {path}" in text
    resumed = Path(re.search(r"resumed from (\S+) at step", text).group(1))
    assert ckpt.verify_checkpoint(resumed) is None
    assert not [p for p in root.iterdir() if p.name.startswith(".step-")]
    final, expected = (load_file(str(r / "checkpoints" / f"step-{steps:08d}" / "model.safetensors"))
                       for r in (out, reference))
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in expected)
