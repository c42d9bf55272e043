"""Checkpoints: everything needed to resume exactly, written atomically.

Layout of one checkpoint, `<checkpoint_dir>/step-<N>/`:
  model.safetensors    weights by Hugging Face Qwen3 parameter name (safe to load: no pickle)
  optimizer.pt         optimizer state (tensors only; loaded with weights_only=True)
  trainer_state.json   step, scheduler state, data-stream position, RNG seeds, the resolved config
A checkpoint is first written to a temporary sibling folder and renamed into place, then the `latest`
file is replaced by rename: a crash mid-save leaves the previous checkpoint and `latest` untouched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


class CheckpointError(RuntimeError):
    pass


@dataclass
class Checkpoint:
    path: Path
    step: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict | None
    trainer_state: dict[str, Any]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu").clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, trainer_state: dict[str, Any],
                    keep: int | None = None) -> Path:
    """Write step-<step> atomically, point `latest` at it, then prune to the `keep` newest."""
    root = Path(ckpt_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:08d}.", dir=root))
    try:
        weights = {name: t.contiguous() for name, t in _to_cpu(model.state_dict()).items()}
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if optimizer is not None:
            torch.save(_to_cpu(optimizer.state_dict()), tmp / "optimizer.pt")
        with open(tmp / STATE_FILE, "w") as f:
            json.dump({**trainer_state, "step": step}, f, indent=1, sort_keys=True)
        for child in tmp.iterdir():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. the end of a resumed run): replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, root / "latest")
    _fsync_dir(root)
    if keep:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (a trainer_state.json is written last), oldest first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(ckpt_dir: str | os.PathLike, which: str | int) -> Path:
    """`which` = 'latest' or a step number -> the checkpoint folder, or a clear error."""
    root = Path(ckpt_dir)
    available = list_checkpoints(root)
    if which == "latest":
        pointer = root / "latest"
        if pointer.is_file():
            named = root / pointer.read_text().strip()
            if (named / STATE_FILE).is_file():
                return named
        if available:
            return available[-1]
        raise CheckpointError(f"resume_from_checkpoint=latest: no checkpoint in {root}")
    wanted = root / f"step-{int(which):08d}"
    if wanted in available:
        return wanted
    steps = ", ".join(str(int(STEP_DIR.match(p.name).group(1))) for p in available) or "none"
    raise CheckpointError(f"resume_from_checkpoint={which}: no such checkpoint in {root}; available steps: {steps}")


def load_checkpoint(path: str | os.PathLike, *, with_optimizer: bool = True) -> Checkpoint:
    path = Path(path)
    if not (path / STATE_FILE).is_file() or not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{path}: not a pallas-dlm checkpoint (needs model.safetensors and {STATE_FILE})")
    with open(path / STATE_FILE) as f:
        state = json.load(f)
    optimizer_state = None
    if with_optimizer and (path / "optimizer.pt").is_file():
        optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    return Checkpoint(path=path, step=int(state["step"]), model_state=load_file(str(path / "model.safetensors")),
                      optimizer_state=optimizer_state, trainer_state=state)


def load_model_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy weights in by name; any missing, unexpected or mis-shaped tensor is an error naming it."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match the model (missing: {missing[:5]}, "
                              f"unexpected: {unexpected[:5]})")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise CheckpointError(f"{source}: {name} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(own[name].shape)}")
    with torch.no_grad():
        for name, param in model.state_dict(keep_vars=True).items():
            param.copy_(state[name].to(device=param.device, dtype=param.dtype))
