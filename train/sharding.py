"""SPMD over several devices with torch_xla's GSPMD: the mesh, and placing model, optimizer state and
inputs on it. What is split along which axis is model/sharding.py's table; this module applies it.

Mesh: axes (data, fsdp, tensor, expert), each of size ici_mesh.<axis> x dcn_mesh.<axis>. ici_mesh is
the layout inside a slice (chips joined by the inter-chip interconnect), dcn_mesh the layout across
slices (joined by the data-centre network); the product of all eight numbers must equal the number of
devices. On TPU the mesh is torch_xla's HybridMesh, which orders the devices by their physical
coordinates (and, across slices, by slice) so that neighbouring mesh positions are ICI neighbours;
elsewhere (virtual CPU devices in tests) the devices are taken in id order. Only DCN-friendly axes
should cross slices: data (gradient all-reduce once per step) or fsdp.

With every axis of size 1 nothing here is used: the run is the plain single-device path.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from omegaconf import DictConfig

from model.sharding import BATCH, fit_spec, parameter_spec
from train.config import MESH_AXES, ConfigError


def mesh_shapes(cfg: DictConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ici shape, dcn shape), in MESH_AXES order."""
    return (tuple(int(cfg.ici_mesh[a]) for a in MESH_AXES),
            tuple(int(cfg.dcn_mesh[a]) for a in MESH_AXES))


def spmd_wanted(cfg: DictConfig) -> bool:
    ici, dcn = mesh_shapes(cfg)
    return math.prod(ici) * math.prod(dcn) > 1


def setup_mesh(cfg: DictConfig):
    """Switch torch_xla to SPMD and set the global mesh, when the mesh has more than one device;
    None (and nothing changed) otherwise. Call before any tensor is placed on the XLA device: SPMD
    mode replaces the per-device view with one virtual device spanning the mesh."""
    if not spmd_wanted(cfg):
        return None
    ici, dcn = mesh_shapes(cfg)
    if ici[MESH_AXES.index("expert")] * dcn[MESH_AXES.index("expert")] > 1:
        raise ConfigError("ici_mesh.expert / dcn_mesh.expert: Qwen3 is a dense model with no experts to "
                          "split; set them to 1 and use data, fsdp or tensor")
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr

    xr.use_spmd()
    _process_group()
    shape = tuple(i * d for i, d in zip(ici, dcn))
    if xr.device_type() == "TPU" or math.prod(dcn) > 1:
        mesh = xs.HybridMesh(ici_mesh_shape=ici, dcn_mesh_shape=dcn, axis_names=MESH_AXES)
    else:
        mesh = xs.Mesh(np.arange(math.prod(shape)), shape, MESH_AXES)
    xs.set_global_mesh(mesh)
    return mesh


def _process_group() -> None:
    """Several hosts (one process each): a gloo process group over torch_xla's rendezvous, which
    torch.distributed.checkpoint needs to coordinate a sharded save (train/checkpoint.py)."""
    import torch.distributed as dist
    import torch_xla.runtime as xr

    if xr.process_count() > 1 and dist.is_available() and not dist.is_initialized():
        import torch_xla.distributed.xla_backend  # noqa: F401  (registers the xla:// init method)

        dist.init_process_group("gloo", init_method="xla://")


def describe(mesh) -> str:
    if mesh is None:
        return "1 device"
    return " x ".join(f"{a}={n}" for a, n in mesh.shape().items()) + f" ({int(mesh.size())} devices, SPMD)"


def shard_model(model: torch.nn.Module, mesh) -> dict[str, tuple]:
    """Place every parameter on the mesh by model/sharding.py's table; returns {name: spec}.
    Call again after weights were copied in (an in-place copy leaves a parameter replicated)."""
    import torch_xla.distributed.spmd as xs

    shape = dict(mesh.shape())
    specs = {}
    for name, param in model.named_parameters():
        spec = parameter_spec(name, param.shape, shape)
        _place(param, mesh, spec)
        specs[name] = spec
    return specs


def _place(t: torch.Tensor, mesh, spec) -> None:
    import torch_xla
    import torch_xla.distributed.spmd as xs

    current = torch_xla._XLAC._get_xla_sharding_spec(t)
    if current and current != "{replicated}":
        return  # already placed (mark_sharding cannot change an annotation in place)
    if current:
        xs.clear_sharding(t)
    xs.mark_sharding(t, mesh, spec)


def shard_optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module, mesh) -> None:
    """Optimizer state tensors shaped like their parameter take the parameter's spec (so FSDP
    splits them too); the rest (step counters, Adafactor's factored rows/columns) stay replicated."""
    shape = dict(mesh.shape())
    for name, param in model.named_parameters():
        spec = parameter_spec(name, param.shape, shape)
        for value in optimizer.state.get(param, {}).values():
            if isinstance(value, torch.Tensor) and value.device.type == "xla" and value.shape == param.shape:
                _place(value, mesh, spec)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """x on the device; under SPMD split along its first (batch) dimension over the batch axes
    (data, fsdp) when they divide it, else replicated."""
    from kernels import spmd_mesh

    x = x.to(device)
    mesh = spmd_mesh()
    if mesh is not None and x.ndim >= 1:
        spec = fit_spec((BATCH,) + (None,) * (x.ndim - 1), x.shape, dict(mesh.shape()))
        if spec[0] is not None:
            import torch_xla.distributed.spmd as xs

            xs.mark_sharding(x, mesh, spec)
    return x
