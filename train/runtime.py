"""The XLA runtime: one place that imports torch_xla, picks the device and synchronises.

torch_xla must be imported and its device created before any CPU autograd runs in the process
(DESIGN.md section 6), so every entry point calls `xla_device()` first.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

# The CPU PJRT client is what runs here; on a TPU VM the environment (or libtpu) selects TPU.
os.environ.setdefault("PJRT_DEVICE", "CPU")
# JAX only traces and lowers the kernels for torch_xla (kernels/binding.py picks the platform); off a TPU
# it must not look for one: with libtpu installed (the tpu-compile extra) it would, and print warnings.
if os.environ["PJRT_DEVICE"].upper() != "TPU":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
# On CPU, PJRT's synchronous client lets torch_xla trace step n+1 while step n runs: with the
# asynchronous one (its default) the step marker waited for the execution, and a qwen3-tiny step took
# ~177 ms instead of ~146 ms on this 2-core machine. TPU runs do not read this variable.
os.environ.setdefault("PJRT_CPU_ASYNC_CLIENT", "0")
# torchax imports flax/orbax, which warn through absl that TensorFlow is missing and "gs:// paths cannot
# be accessed"; that concerns their own file layer, not ours (data/ reads gs:// through fsspec).
logging.getLogger("absl").setLevel(logging.ERROR)


@functools.lru_cache(maxsize=None)
def xla_device() -> torch.device:
    import torch_xla

    return torch_xla.device()


def device_kind() -> str:
    """'TPU', 'CPU', ... as PJRT names it."""
    import torch_xla.runtime as xr

    return xr.device_type()


def is_tpu() -> bool:
    return device_kind() == "TPU"


def device_count() -> int:
    import torch_xla.runtime as xr

    return xr.global_runtime_device_count()


def prepare_compile_only(devices: int) -> None:
    """Before the XLA device exists: trace on the CPU with one virtual device per TPU chip of the
    ahead-of-time target (train/aot.py), whatever this machine is."""
    os.environ["PJRT_DEVICE"] = "CPU"
    os.environ["JAX_PLATFORMS"] = "cpu"
    if devices > 1:
        os.environ["CPU_NUM_DEVICES"] = str(devices)


def sync() -> None:
    """Cut the lazy graph here and run it (one compiled graph per distinct shape)."""
    import torch_xla

    torch_xla.sync()


def compile_count() -> int:
    """How many graphs torch_xla has compiled so far in this process."""
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0
