"""Checkpoints: everything needed to resume exactly, written atomically.

Layout of one checkpoint, `<checkpoint_dir>/step-<N>/`:
  model.safetensors    weights by Hugging Face Qwen3 parameter name (safe to load: no pickle)
  optimizer.pt         optimizer state (tensors only; loaded with weights_only=True)
  trainer_state.json   step, scheduler state, data-stream position, RNG seeds, the resolved config
  manifest.json        written last: format version, step, and every other file's path, size and sha256
A checkpoint is first written to a temporary sibling folder and renamed into place, then the `latest`
file is replaced by rename: a crash mid-save leaves the previous checkpoint and `latest` untouched.
Loading verifies the manifest first (`verify_checkpoint`): a truncated, missing or altered file is one
line naming the checkpoint and the file, and `resolve_checkpoint(..., "latest")` then falls back to the
newest older checkpoint that verifies.

A run sharded over several devices (SPMD, train/sharding.py) writes a *sharded* checkpoint instead:
  model/               model.state_dict() in torch.distributed.checkpoint (DCP) format: every host writes
                       the shards it holds, with torch_xla's SPMDSavePlanner; no host gathers the model
  optimizer/           optimizer.state_dict(), the same way
  trainer_state.json   as above, plus "sharded": true
  manifest.json        as above, listing every shard file of model/ and optimizer/
Restoring reads each tensor's pieces by global offsets (torch_xla's SPMDLoadPlanner), so the mesh may
differ from the one that saved it (fsdp=4 -> fsdp=2, or one device: `load_checkpoint` then assembles
whole tensors on the host).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT, MANIFEST_VERSION = "pallas-dlm checkpoint manifest", 1
# trainer_state.json of a checkpoint written with a manifest says so, so that a deleted manifest.json is
# told apart from a checkpoint written before manifests existed.
MANIFEST_KEY = "manifest"
HASH_CHUNK = 4 << 20


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


# ---- the manifest ----------------------------------------------------------------------------------
# Hashing reads every file back once (from the page cache, just after writing it; files in parallel
# threads: hashlib releases the GIL). Measured: sha256 of a 100 MB file in 0.07-0.09 s on one core of the
# 2-core CI machine (~1.2 GB/s; 0.13 s with the machine busy), so ~7 ms for a qwen3-tiny checkpoint
# (7.6 MB) and ~20 s for Qwen3-1.7B with fp32 AdamW state (~20 GB) on one core, less with several files
# on several cores. Verifying on load costs the same read again.

def _sha256(path: Path) -> str:
    """sha256 of a file, read in HASH_CHUNK pieces (never the whole file in memory)."""
    digest, buf = hashlib.sha256(), bytearray(HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _hash_all(paths: list[Path]) -> list[str]:
    if len(paths) < 2:
        return [_sha256(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1, 8)) as pool:
        return list(pool.map(_sha256, paths))


def _files_under(folder: Path) -> list[str]:
    """Every file under `folder` (recursively: the DCP folders), as sorted '/'-separated relative paths."""
    found = []
    for dirpath, _, names in os.walk(folder):
        for name in names:
            found.append((Path(dirpath) / name).relative_to(folder).as_posix())
    return sorted(found)


def _write_manifest(folder: Path, step: int) -> None:
    """manifest.json: every other file's size and sha256, written last and fsynced."""
    names = [n for n in _files_under(folder) if n != MANIFEST_FILE]
    paths = [folder / n for n in names]
    for path in paths:  # on disk before they are hashed and listed
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    files = {n: {"size": p.stat().st_size, "sha256": h} for n, p, h in zip(names, paths, _hash_all(paths))}
    with open(folder / MANIFEST_FILE, "w") as f:
        json.dump({"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "step": step, "files": files}, f,
                  indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    for sub in {(folder / n).parent for n in names} | {folder}:
        _fsync_dir(sub)


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _read_state(path: Path) -> dict[str, Any]:
    """trainer_state.json, or one line naming it."""
    try:
        with open(path / STATE_FILE) as f:
            state = json.load(f)
        int(state["step"])
        return state
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {STATE_FILE} is missing") from None
    except (OSError, ValueError, TypeError, KeyError) as err:
        what = "holds no step" if isinstance(err, KeyError) else f"cannot be read ({_one_line(err)})"
        raise CheckpointError(f"{path}: {STATE_FILE} {what}; the checkpoint is incomplete or damaged") from None


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        with open(path / MANIFEST_FILE) as f:
            manifest = json.load(f)
        files = manifest["files"]
        version, step = int(manifest["version"]), int(manifest["step"])
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError("not a pallas-dlm checkpoint manifest")
        for name, entry in files.items():
            int(entry["size"]), str(entry["sha256"])
            if name.startswith("/") or ".." in name.split("/"):
                raise ValueError(f"file name {name!r} outside the checkpoint")
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise CheckpointError(f"{path}: {MANIFEST_FILE} cannot be read ({_one_line(err)}); the checkpoint is "
                              f"incomplete or damaged") from None
    if version > MANIFEST_VERSION:
        raise CheckpointError(f"{path}: {MANIFEST_FILE} has version {version}, this pallas-dlm reads up to "
                              f"{MANIFEST_VERSION}; update pallas-dlm")
    named = STEP_DIR.match(path.name)
    if named and int(named.group(1)) != step:
        raise CheckpointError(f"{path}: {MANIFEST_FILE} is of step {step}, the folder is named for step "
                              f"{int(named.group(1))}")
    return manifest


def _is_optimizer_file(name: str) -> bool:
    return name == "optimizer.pt" or name.startswith(OPTIMIZER_DCP + "/")


# Verified folders of this process, by every file's (name, size, mtime, inode): the trainer resolves
# a checkpoint several times at start-up (architecture, shift_logits, the restore) and hashes it once.
_VERIFIED: dict[tuple[str, bool], tuple[tuple, str | None]] = {}


def _signature(path: Path) -> tuple:
    out = []
    for name in _files_under(path):
        st = (path / name).stat()
        out.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def verify_checkpoint(path: str | os.PathLike, *, with_optimizer: bool = True) -> str | None:
    """Check a checkpoint folder against its manifest before anything reads it: a missing manifest, a
    missing file, a size or sha256 that differs, a manifest that does not parse -> CheckpointError, one line
    naming the folder and the file. Returns None, or a one-line warning for a checkpoint written before
    manifests existed. with_optimizer=False leaves the optimizer's files unchecked (init_from, export).

    A folder without manifest.json is accepted only when all of these hold: its name is not the `.step-*`
    temporary name of an unfinished save, its trainer_state.json parses and does not say a manifest was
    written (so a deleted manifest is damage, not age), and its files load. Such a checkpoint was written
    before manifests by the same write-to-temp-then-rename save, so it was complete when renamed; only
    damage since then goes unnoticed, which the warning says. Refusing it instead would strand every run
    saved by an earlier version."""
    path = Path(path)
    if path.name.startswith(".step-"):
        raise CheckpointError(f"{path}: the temporary folder of an unfinished save, not a checkpoint")
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    key = (str(path.resolve()), with_optimizer)
    signature = _signature(path)
    if key in _VERIFIED and _VERIFIED[key][0] == signature:
        return _VERIFIED[key][1]
    if (path / MANIFEST_FILE).is_file():
        note = _verify_manifest(path, with_optimizer)
    else:
        note = _verify_legacy(path, with_optimizer)
    _VERIFIED[key] = (signature, note)
    return note


def _verify_manifest(path: Path, with_optimizer: bool) -> None:
    manifest = _read_manifest(path)
    listed = [(n, e) for n, e in sorted(manifest["files"].items()) if with_optimizer or not _is_optimizer_file(n)]
    to_hash = []
    for name, entry in listed:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing (listed in {MANIFEST_FILE}); the checkpoint is "
                                  f"damaged")
        size = file.stat().st_size
        if size != int(entry["size"]):
            raise CheckpointError(f"{path}: {name} has {size} bytes, {MANIFEST_FILE} records {int(entry['size'])} "
                                  f"(truncated or damaged)")
        to_hash.append((name, file, entry["sha256"]))
    listed_names = set(manifest["files"]) | {MANIFEST_FILE}
    for name in _files_under(path):  # a file the loaders would read must have been hashed
        read = name in ("model.safetensors", "optimizer.pt", STATE_FILE) or name.startswith(MODEL_DCP + "/") \
            or name.startswith(OPTIMIZER_DCP + "/")
        if name not in listed_names and read and (with_optimizer or not _is_optimizer_file(name)):
            raise CheckpointError(f"{path}: {name} is not listed in {MANIFEST_FILE} (added after the save)")
    for (name, _, want), got in zip(to_hash, _hash_all([f for _, f, _ in to_hash])):
        if got != want:
            raise CheckpointError(f"{path}: {name} does not match its sha256 in {MANIFEST_FILE} (damaged)")
    return None


def _verify_legacy(path: Path, with_optimizer: bool) -> str:
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path}: no {MANIFEST_FILE} and no {STATE_FILE}: not a checkpoint, or an "
                              f"incomplete or damaged one")
    state = _read_state(path)
    if state.get(MANIFEST_KEY):
        raise CheckpointError(f"{path}: {MANIFEST_FILE} is missing, though {STATE_FILE} says one was written; "
                              f"the checkpoint is incomplete or damaged")
    if is_sharded_checkpoint(path):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        for name in (MODEL_DCP, OPTIMIZER_DCP) if with_optimizer else (MODEL_DCP,):
            if (path / name).is_dir():
                try:
                    dcp.FileSystemReader(str(path / name)).read_metadata()
                except (Exception, CheckpointException) as err:  # DCP's own exception is a BaseException
                    raise CheckpointError(f"{path}: {name}/.metadata cannot be read ({_one_line(err)})") from None
    else:
        _load_weights_file(path)
        if with_optimizer and (path / "optimizer.pt").is_file():
            _load_optimizer_file(path)
    return (f"warning: {path} was written before manifests: its files load, but damage to them cannot be "
            f"detected")


def _load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    file = path / "model.safetensors"
    if not file.is_file():
        raise CheckpointError(f"{path}: model.safetensors is missing")
    try:
        return load_file(str(file))
    except Exception as err:  # safetensors' SafetensorError, OSError
        raise CheckpointError(f"{path}: model.safetensors cannot be read ({_one_line(err)})") from None


def _load_optimizer_file(path: Path) -> dict:
    try:
        return torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated zip, an unpickling error, OSError
        raise CheckpointError(f"{path}: optimizer.pt cannot be read ({_one_line(err)})") from None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


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
            json.dump({**trainer_state, "step": step, MANIFEST_KEY: MANIFEST_FILE}, f, indent=1, sort_keys=True)
        _write_manifest(tmp, step)  # last: fsyncs every file, then itself and the folder
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
        # Only checkpoints older than the one just written (complete and verified-by-construction) are
        # pruned, the newest keep-1 of them kept. Newer folders (a run resumed from an older step, after a
        # fallback past damaged checkpoints) are left for the save of their step to replace: pruning by step
        # order alone could delete the new checkpoint and leave only damaged ones.
        step = int(STEP_DIR.match(final.name).group(1))
        older = [p for p in list_checkpoints(root) if int(STEP_DIR.match(p.name).group(1)) < step]
        for old in older[:max(0, len(older) - (keep - 1))]:
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
                json.dump({**trainer_state, "step": step, "sharded": True, MANIFEST_KEY: MANIFEST_FILE}, f,
                          indent=1, sort_keys=True)
            _write_manifest(tmp, step)  # every host's shards are written (the barrier above): hash them all
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
    verify_checkpoint(path, with_optimizer=optimizer is not None)  # its legacy warning: resolve_checkpoint's
    trainer_state = _read_state(path)
    no_dist, _, _ = _dist()
    state = model.state_dict()
    try:
        metadata = dcp.FileSystemReader(str(path / MODEL_DCP)).read_metadata()
    except (Exception, CheckpointException) as err:
        raise CheckpointError(f"{path}: {MODEL_DCP}/.metadata cannot be read ({_one_line(err)})") from None
    _check_names(path, state, metadata)
    try:
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(path / MODEL_DCP)), planner=SPMDLoadPlanner(),
                 no_dist=no_dist)
    except (Exception, CheckpointException) as err:
        raise CheckpointError(f"{path}: the sharded weights in {MODEL_DCP}/ cannot be read "
                              f"({_one_line(err)})") from None
    if optimizer is not None and (path / OPTIMIZER_DCP).is_dir():
        opt_state = optimizer.state_dict()
        try:
            dcp.load(opt_state, storage_reader=dcp.FileSystemReader(str(path / OPTIMIZER_DCP)),
                     planner=SPMDLoadPlanner(), no_dist=no_dist)
        except (Exception, CheckpointException) as err:  # DCP's own exception is a BaseException
            raise CheckpointError(f"{path}: optimizer state does not fit this run's parameters "
                                  f"({OPTIMIZER_HINT}): {str(err).strip().splitlines()[-1]}") from None
        load_optimizer_state(optimizer, opt_state, str(path))
    return trainer_state


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
    """The step-N folders that look like checkpoints (a manifest.json or trainer_state.json), oldest first;
    whether one is complete and intact is verify_checkpoint's to say."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and ((p / STATE_FILE).is_file() or (p / MANIFEST_FILE).is_file())]
    return [p for _, p in sorted(found)]


def _step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def resolve_checkpoint(ckpt_dir: str | os.PathLike, which: str | int, *, log=None) -> Path:
    """`which` = 'latest' or a step number -> a checkpoint folder that verifies (verify_checkpoint), or a
    one-line CheckpointError. 'latest' is the folder `latest` names, or the newest; when that one fails to
    verify, the newest older one that does, each damaged one logged (`log`, one line each; None: silent).
    Damaged checkpoints are left where they are. A step number is that checkpoint or an error: no fallback."""
    root = Path(ckpt_dir)
    available = list_checkpoints(root)
    if which == "latest":
        named = _latest_name(root)
        pointed = root / named if named and STEP_DIR.match(named) and (root / named).is_dir() else None
        if pointed is not None:  # the checkpoint `latest` names, then the older ones, newest first
            candidates = [pointed] + [p for p in reversed(available) if _step_of(p) < _step_of(pointed)]
        else:
            candidates = list(reversed(available))
        if not candidates:
            raise CheckpointError(f"resume_from_checkpoint=latest: no checkpoint in {root}")
        damaged: list[str] = []
        for path in candidates:
            try:
                note = verify_checkpoint(path)
            except CheckpointError as err:
                damaged.append(str(err))
                if log:
                    log(f"warning: damaged checkpoint, not resuming from it (left in place): {err}")
                continue
            if log and damaged:
                log(f"resume_from_checkpoint=latest: {path} is the newest checkpoint that verifies; resuming "
                    f"from it instead of {candidates[0].name}")
            if log and note:
                log(note)
            return path
        raise CheckpointError(f"resume_from_checkpoint=latest: none of the {len(candidates)} checkpoints in {root} "
                              f"verifies; the newest: {damaged[0]}")
    wanted = root / f"step-{int(which):08d}"
    if wanted not in available:
        steps = ", ".join(str(_step_of(p)) for p in available) or "none"
        raise CheckpointError(f"resume_from_checkpoint={which}: no such checkpoint in {root}; available steps: {steps}")
    try:
        note = verify_checkpoint(wanted)
    except CheckpointError as err:
        raise CheckpointError(f"resume_from_checkpoint={which}: {err}") from None
    if log and note:
        log(note)
    return wanted


def load_checkpoint(path: str | os.PathLike, *, with_optimizer: bool = True, log=_stderr) -> Checkpoint:
    """A checkpoint as host tensors (a sharded one is assembled whole: its mesh does not matter), after
    verify_checkpoint; any file that does not verify or load is one CheckpointError naming it. `log`
    receives the warning about a checkpoint written before manifests (None: silent)."""
    path = Path(path)
    if not (path / STATE_FILE).is_file() and not (path / MANIFEST_FILE).is_file():
        raise CheckpointError(f"{path}: not a pallas-dlm checkpoint (needs {MANIFEST_FILE}, model.safetensors and "
                              f"{STATE_FILE})")
    note = verify_checkpoint(path, with_optimizer=with_optimizer)
    if note and log:
        log(note)
    state = _read_state(path)
    if is_sharded_checkpoint(path):
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            optimizer_state = None
            if with_optimizer and (path / OPTIMIZER_DCP).is_dir():
                optimizer_state = _read_optimizer_dcp(path / OPTIMIZER_DCP)
            model_state = _read_dcp(path / MODEL_DCP)
        except (Exception, CheckpointException) as err:  # DCP's own exception is a BaseException
            raise CheckpointError(f"{path}: the sharded state cannot be read ({_one_line(err)})") from None
        return Checkpoint(path=path, step=int(state["step"]), model_state=model_state,
                          optimizer_state=optimizer_state, trainer_state=state)
    optimizer_state = None
    if with_optimizer and (path / "optimizer.pt").is_file():
        optimizer_state = _load_optimizer_file(path)
    return Checkpoint(path=path, step=int(state["step"]), model_state=_load_weights_file(path),
                      optimizer_state=optimizer_state, trainer_state=state)


def load_model_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy weights in by name; any missing, unexpected or mis-shaped tensor is an error naming it."""
    _check_shapes(source, {k: tuple(t.shape) for k, t in model.state_dict().items()},
                  {k: tuple(t.shape) for k, t in state.items()})
    with torch.no_grad():
        for name, param in model.state_dict(keep_vars=True).items():
            param.copy_(state[name].to(device=param.device, dtype=param.dtype))
