"""Checkpoints: everything needed to resume exactly, written atomically.

Layout of one checkpoint, `<checkpoint_dir>/step-<N>/`:
  model.safetensors    weights by Hugging Face Qwen3 parameter name (safe to load: no pickle)
  optimizer.pt         optimizer state (tensors only; loaded with weights_only=True)
  trainer_state.json   step, scheduler state, data-stream position, RNG seeds, the resolved config
A checkpoint is first written to a temporary sibling folder and renamed into place, then the `latest`
file is replaced by rename: a crash mid-save leaves the previous checkpoint and `latest` untouched.

A run sharded over several devices (SPMD, train/sharding.py) writes a *sharded* checkpoint instead:
  model/               model.state_dict() in torch.distributed.checkpoint (DCP) format: every host writes
                       the shards it holds, with torch_xla's SPMDSavePlanner; no host gathers the model
  optimizer/           optimizer.state_dict(), the same way
  trainer_state.json   as above, plus "sharded": true
Restoring reads each tensor's pieces by global offsets (torch_xla's SPMDLoadPlanner), so the mesh may
differ from the one that saved it (fsdp=4 -> fsdp=2, or one device: `load_checkpoint` then assembles
whole tensors on the host).
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
                    keep: int | None = None, sharded: bool = False) -> Path:
    """Write step-<step> atomically, point `latest` at it, then prune to the `keep` newest.
    sharded: write the model and optimizer as DCP shards (a run on an SPMD mesh)."""
    if sharded:
        return _save_sharded(Path(ckpt_dir), step, model, optimizer, trainer_state, keep)
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
    except Exception as err:  # a full disk, a folder gone read-only (safetensors and torch.save raise their own
        # types for an OSError underneath): one line, and the previous checkpoint stays `latest`
        shutil.rmtree(tmp, ignore_errors=True)
        kept = _latest_name(root)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else (str(err).splitlines() or [""])[0]
        raise CheckpointError(f"{root}: saving step {step} failed ({reason or type(err).__name__}); "
                              f"{'the previous checkpoint ' + kept + ' is kept' if kept else 'no checkpoint yet'}"
                              ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _point_latest(root, final, keep)
    return final


def _latest_name(root: Path) -> str | None:
    try:
        return (root / "latest").read_text().strip() or None
    except OSError:
        return None


def _point_latest(root: Path, final: Path, keep: int | None) -> None:
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, root / "latest")
    _fsync_dir(root)
    if keep:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


# ---- sharded (SPMD) checkpoints ------------------------------------------------------------------

MODEL_DCP, OPTIMIZER_DCP = "model", "optimizer"


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / MODEL_DCP / ".metadata").is_file()


def _dist():
    """(no_dist, is this process the coordinator, barrier) for torch.distributed.checkpoint: one
    process (a single host, the CPU tests) needs no process group; several hosts use the one
    train/sharding.py set up."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return False, dist.get_rank() == 0, dist.barrier
    return True, True, lambda: None


def _save_sharded(root: Path, step: int, model, optimizer, trainer_state, keep) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch_xla.experimental.distributed_checkpoint import SPMDSavePlanner

    no_dist, coordinator, barrier = _dist()
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.sharded.tmp"  # the same name on every host
    if coordinator:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    try:
        parts = [(MODEL_DCP, model.state_dict())]
        # Entries that are views (a stacked decoder weight's rows, model.remat.scan_layers) become device
        # data in one graph here, instead of one small graph each when DCP reads them.
        import torch_xla

        torch_xla.sync()
        if optimizer is not None:
            parts.append((OPTIMIZER_DCP, optimizer.state_dict()))
        for name, state in parts:
            # per_thread_copy_ahead=0: the serial host copier. The overlapping one asks the
            # "available" accelerator module for CUDA-style streams, and torchax's does not have them.
            writer = dcp.FileSystemWriter(str(tmp / name), per_thread_copy_ahead=0)
            dcp.save(state, storage_writer=writer, planner=SPMDSavePlanner(), no_dist=no_dist)
        barrier()
        if coordinator:
            with open(tmp / STATE_FILE, "w") as f:
                json.dump({**trainer_state, "step": step, "sharded": True}, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            _point_latest(root, final, keep)
    except BaseException:
        if coordinator:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    return final


def _read_dcp(path: Path) -> dict:
    """A DCP folder as whole tensors on the host, in the structure it was saved from (what
    torch.distributed.checkpoint.format_utils.dcp_to_torch_save does, without the file)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    _load_state_dict(state, storage_reader=dcp.FileSystemReader(str(path)),
                     planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return state


def _read_optimizer_dcp(path: Path) -> dict:
    state = _read_dcp(path)
    # The flattened paths store the per-parameter indices as strings; torch.optim wants ints.
    state["state"] = {int(k): v for k, v in state.get("state", {}).items()}
    return state


def load_sharded_into(path: str | os.PathLike, model: torch.nn.Module,
                      optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore a sharded checkpoint in place into a model (and optimizer, whose state must already
    exist) placed on the current SPMD mesh, whatever mesh saved it; returns its trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch_xla.experimental.distributed_checkpoint import SPMDLoadPlanner

    path = Path(path)
    if not is_sharded_checkpoint(path) or not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path}: not a sharded pallas-dlm checkpoint (needs {MODEL_DCP}/ and {STATE_FILE})")
    no_dist, _, _ = _dist()
    state = model.state_dict()
    _check_names(path, state, dcp.FileSystemReader(str(path / MODEL_DCP)).read_metadata())
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(path / MODEL_DCP)), planner=SPMDLoadPlanner(),
             no_dist=no_dist)
    if optimizer is not None and (path / OPTIMIZER_DCP).is_dir():
        opt_state = optimizer.state_dict()
        try:
            dcp.load(opt_state, storage_reader=dcp.FileSystemReader(str(path / OPTIMIZER_DCP)),
                     planner=SPMDLoadPlanner(), no_dist=no_dist)
        except (Exception, CheckpointException) as err:  # DCP's own exception is a BaseException
            raise CheckpointError(f"{path}: optimizer state does not fit this run's parameters "
                                  f"({OPTIMIZER_HINT}): {str(err).strip().splitlines()[-1]}") from None
        load_optimizer_state(optimizer, opt_state, str(path))
    with open(path / STATE_FILE) as f:
        return json.load(f)


OPTIMIZER_HINT = ("was it written with another model.remat.scan_layers setting? Resume with the same one, "
                  "or start a new run from its weights with init_from")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, source: str) -> None:
    """optimizer.load_state_dict, refusing state that does not fit the parameters: torch.optim checks
    only the number of tensors, and an elementwise update would broadcast a mis-shaped moment."""
    try:
        optimizer.load_state_dict(state)
    except ValueError as err:
        raise CheckpointError(f"{source}: optimizer state does not fit this run's parameters "
                              f"({OPTIMIZER_HINT}): {err}") from None
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.ndim and value.shape != param.shape \
                        and key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
                    raise CheckpointError(f"{source}: optimizer state {key} has shape {tuple(value.shape)} for a "
                                          f"parameter of shape {tuple(param.shape)} ({OPTIMIZER_HINT})")


def _check_shapes(source, expected: dict[str, tuple], given: dict[str, tuple]) -> None:
    """Same tensor names and shapes, or an error naming the first difference."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match the model (missing: {missing[:5]}, "
                              f"unexpected: {unexpected[:5]})")
    for name, shape in given.items():
        if shape != expected[name]:
            raise CheckpointError(f"{source}: {name} has shape {shape}, the model expects {expected[name]}")


def _check_names(path: Path, own: dict, metadata) -> None:
    _check_shapes(path, {k: tuple(t.shape) for k, t in own.items()},
                  {k: tuple(getattr(m, "size", ())) for k, m in metadata.state_dict_metadata.items()})


def remove_stale_temps(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Remove the `.step-N.*` folders of saves that were interrupted (kill -9, power loss): a save writes
    into such a folder and renames it into place only once complete, so none of them is a checkpoint.
    Call it when no other process saves into `ckpt_dir`. Returns what was removed."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(".step-")]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


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
    """A checkpoint as host tensors (a sharded one is assembled whole: its mesh does not matter)."""
    path = Path(path)
    if is_sharded_checkpoint(path) and (path / STATE_FILE).is_file():
        with open(path / STATE_FILE) as f:
            state = json.load(f)
        optimizer_state = None
        if with_optimizer and (path / OPTIMIZER_DCP).is_dir():
            optimizer_state = _read_optimizer_dcp(path / OPTIMIZER_DCP)
        return Checkpoint(path=path, step=int(state["step"]), model_state=_read_dcp(path / MODEL_DCP),
                          optimizer_state=optimizer_state, trainer_state=state)
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
    _check_shapes(source, {k: tuple(t.shape) for k, t in model.state_dict().items()},
                  {k: tuple(t.shape) for k, t in state.items()})
    with torch.no_grad():
        for name, param in model.state_dict(keep_vars=True).items():
            param.copy_(state[name].to(device=param.device, dtype=param.dtype))
