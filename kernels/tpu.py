"""What the kernels need to know about the TPU they are compiled for. Pure Python + JAX, no torch.

* `CHIPS`: per TPU generation, what the compiler and the kernels' tile choice depend on: VMEM per
  TensorCore (read off libtpu: a scratch buffer one byte too large is refused with this size), HBM
  per device as libtpu's compiler budgets it, and the published bf16 peak and HBM bandwidth (for
  roofline figures only).
* The target chip: set explicitly by the ahead-of-time compile (`compile_for`), else the chip the
  process runs on (the PJRT device kind torch_xla or JAX reports), else none. With no chip known the
  kernels size their tiles for the smallest VMEM of all generations, which compiles everywhere.
* The Mosaic IR version: jax 0.7.1 serialises Mosaic kernels at version 8 unless it recognises an
  older Cloud TPU runtime from its *default* backend's build date. libtpu 0.0.21 (what
  torch_xla[tpu] 2.9.0 pins) reads at most version 7, and inside torch_xla the default JAX backend
  is not the TPU runtime that compiles the graph. So the version is pinned here, for the pinned
  libtpu, and never detected (`pin_mosaic_ir_version`, applied by the kernel modules on import).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re

MiB = 1 << 20
GiB = 1 << 30

# The highest Mosaic serialisation version libtpu 0.0.21 deserialises ("Unsupported version:
# expected <= 7 but got 8" at 8). Raise it together with the libtpu pin in pyproject.toml.
MOSAIC_IR_VERSION = 7
LIBTPU_VERSION = "0.0.21"


@dataclasses.dataclass(frozen=True)
class TpuChip:
    name: str               # our name: v4, v5e, v5p, v6e (also the topology prefix: "v5e:2x4")
    device_kind: str        # what PJRT (torch_xla, JAX) calls a device of this generation
    vmem_bytes: int         # VMEM per TensorCore
    hbm_bytes: int          # HBM per device, as the compiler budgets it ("Used X of <this> hbm")
    peak_bf16_flops: float  # published dense bf16 peak per chip, FLOP/s
    hbm_bytes_per_s: float  # published HBM bandwidth per chip
    bf16_vpu: bool = True   # elementwise bf16 in hardware; v4 widens it to fp32, with fp32-sized temporaries

    @property
    def kernel_vmem_limit(self) -> int:
        """The most scoped VMEM a kernel may declare: all but an eighth (at least 2 MiB), which XLA
        keeps for its own buffers around the kernel (v4 with 15 of its 16 MiB declared: "Used 16.28M
        of 16.00M vmem")."""
        return self.vmem_bytes - max(self.vmem_bytes // 8, 2 * MiB)

    @property
    def kernel_vmem_budget(self) -> int:
        """What a kernel's own estimate of its buffers and temporaries may reach. The estimates are
        upper bounds of what Mosaic allocates (tests/test_tpu_compile.py compiles kernels declaring
        exactly their estimate), so they may fill the whole limit."""
        return self.kernel_vmem_limit

    def declared_vmem(self, estimate: int) -> int:
        """The scoped VMEM limit a kernel declares for its estimate: a quarter more and 2 MiB for what
        the estimate does not model, within kernel_vmem_limit; the rest stays XLA's."""
        return min(self.kernel_vmem_limit, estimate * 5 // 4 + 2 * MiB)


CHIPS: dict[str, TpuChip] = {c.name: c for c in (
    TpuChip("v4", "TPU v4", 16 * MiB, int(15.25 * GiB), 275e12, 1.2e12, bf16_vpu=False),
    TpuChip("v5e", "TPU v5 lite", 128 * MiB, int(15.75 * GiB), 197e12, 0.819e12),
    TpuChip("v5p", "TPU v5", 64 * MiB, int(95.74 * GiB), 459e12, 2.765e12),
    TpuChip("v6e", "TPU v6 lite", 128 * MiB, int(31.25 * GiB), 918e12, 1.64e12),
)}

# With no chip known: the smallest VMEM of all generations, so tiles chosen for it fit everywhere.
ANY_CHIP = TpuChip("any", "any TPU", min(c.vmem_bytes for c in CHIPS.values()),
                   min(c.hbm_bytes for c in CHIPS.values()), 0.0, 0.0, bf16_vpu=False)


def get_chip(name: str | TpuChip | None) -> TpuChip:
    """A chip by name (v4, v5e, v5p, v6e), by PJRT device kind ("TPU v5 lite"), or ANY_CHIP for None."""
    if name is None:
        return ANY_CHIP
    if isinstance(name, TpuChip):
        return name
    key = str(name).strip()
    if key in CHIPS:
        return CHIPS[key]
    for chip in CHIPS.values():
        if key.lower() == chip.device_kind.lower():
            return chip
    if key == ANY_CHIP.name:
        return ANY_CHIP
    raise ValueError(f"unknown TPU generation {name!r}; known: {', '.join(CHIPS)}")


def parse_topology(spec: str) -> tuple[TpuChip, str]:
    """'v5e:2x4' -> (the v5e chip, '2x4'): a generation and its chip grid (2 or 3 dimensions)."""
    match = re.fullmatch(r"\s*(v\d+[a-z]?)\s*:\s*(\d+(?:x\d+){1,2})\s*", str(spec))
    if not match or match.group(1) not in CHIPS:
        raise ValueError(f"TPU topology {spec!r}: expected <generation>:<chips grid>, e.g. v5e:2x4, "
                         f"v6e:2x4, v5p:2x2x2, v4:2x2x1 (generations: {', '.join(CHIPS)})")
    return CHIPS[match.group(1)], match.group(2)


def topology_chips(grid: str) -> int:
    n = 1
    for part in grid.split("x"):
        n *= int(part)
    return n


# ---- the target chip ----------------------------------------------------------------------------

# Process-wide, not per thread: autograd runs the backward (and so lowers its kernels) on its own
# threads.
_target: list[TpuChip | None] = [None]


@contextlib.contextmanager
def compile_for(chip: str | TpuChip):
    """Within this block the kernels lower for TPU and size themselves for `chip` (the ahead-of-time
    compile of a train step for a topology that is not here)."""
    previous = _target[0]
    _target[0] = get_chip(chip)
    try:
        yield _target[0]
    finally:
        _target[0] = previous


def compile_target() -> TpuChip | None:
    """The chip `compile_for` set, if any."""
    return _target[0]


def resolve_chip(chip: str | TpuChip | None = None) -> TpuChip:
    """The chip a Mosaic kernel is sized for: `chip` when given (the binding passes the device's),
    else the `compile_for` target, else the TPU JAX itself runs on, else ANY_CHIP."""
    if chip is not None:
        return get_chip(chip)
    target = compile_target()
    if target is not None:
        return target
    import jax

    if jax.default_backend() == "tpu":
        found = detect_chip(jax.devices()[0].device_kind)
        if found is not None:
            return found
    return ANY_CHIP


def detect_chip(device_kind: str | None) -> TpuChip | None:
    """The chip of a PJRT device kind string ("TPU v5 lite"), None when it is not a known TPU."""
    if not device_kind:
        return None
    try:
        return get_chip(device_kind)
    except ValueError:
        return None


# ---- the compiler -------------------------------------------------------------------------------


def topology(spec: str):
    """libtpu's description of a TPU topology ('v5e:2x4'), for compiling with no TPU present: its
    `.devices` build meshes and device assignments, their `.client` compiles. Needs libtpu (the
    `tpu-compile` extra, pinned to what torch_xla[tpu] uses)."""
    import importlib.util
    import os

    chip, grid = parse_topology(spec)
    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError(f"compiling for TPU needs libtpu: pip install -e '.[tpu-compile]' (libtpu=={LIBTPU_VERSION})")
    from jax.experimental import topologies

    # libtpu reads these once, when it first loads, to find the slice it runs on; with no TPU here
    # any valid values do, and without them it prints a page of warnings. It also takes a lock file
    # that a second process (a test's subprocess, a report's next case) must be allowed past.
    # Restored afterwards so that nothing else in the process (or its children) takes this machine
    # for a TPU VM.
    quiet = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
             "TPU_ACCELERATOR_TYPE": "v5litepod-1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    saved = {k: os.environ.get(k) for k in quiet}
    os.environ.update({k: v for k, v in quiet.items() if saved[k] is None})
    # A host holds 2x2x1 chips unless told otherwise; a grid smaller than that is a host of its own.
    dims = [int(d) for d in grid.split("x")] + [1] * (3 - len(grid.split("x")))
    hosts = {} if all(d % b == 0 for d, b in zip(dims, (2, 2, 1))) else {
        "chips_per_host_bounds": tuple(min(d, b) for d, b in zip(dims, (2, 2, 1)))}
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=f"{chip.name}:{grid}", **hosts)
    except Exception as err:  # libtpu's XlaRuntimeError: a grid the generation cannot form
        raise ValueError(f"TPU topology {spec!r}: libtpu cannot build it: {str(err).splitlines()[0]}") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)


# ---- Mosaic -------------------------------------------------------------------------------------

_pinned = False


def pin_mosaic_ir_version() -> None:
    """Make every Mosaic kernel lowered in this process serialise at MOSAIC_IR_VERSION.

    jax 0.7.1 asks `tpu_custom_call.get_ir_version(ctx)` at each lowering, and answers from the
    default backend's build date (a Cloud TPU runtime older than a cut-off gets an older version)
    or from export's forward-compatibility mode; we answer from the libtpu we pin instead."""
    global _pinned
    if _pinned:
        return
    from jax._src import tpu_custom_call

    if not hasattr(tpu_custom_call, "get_ir_version"):
        raise RuntimeError("kernels.tpu: this jax has no tpu_custom_call.get_ir_version to pin the "
                           "Mosaic IR version with; the project pins jax 0.7.1 (pyproject.toml)")
    tpu_custom_call.get_ir_version = _pinned_ir_version
    _pinned = True


def _pinned_ir_version(ctx) -> int:
    del ctx
    return MOSAIC_IR_VERSION


def mosaic_kernels(module) -> list[tuple[str, int]]:
    """(kernel name, Mosaic IR version) of every tpu_custom_call in a lowered module (the MLIR of
    `jax.jit(f).trace(...).lower(...)`.compiler_ir()), read back from the serialised kernels."""
    import base64
    import json

    from jaxlib.mlir import ir

    found = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    child = child.operation
                    if (child.name == "stablehlo.custom_call"
                            and ir.StringAttr(child.attributes["call_target_name"]).value == "tpu_custom_call"):
                        config = json.loads(ir.StringAttr(child.attributes["backend_config"]).value)
                        found.append(_read_kernel(base64.b64decode(config["custom_call_config"]["body"])))
                    walk(child)

    walk(module.operation)
    return found


def _read_kernel(body: bytes) -> tuple[str, int]:
    from jaxlib.mlir import ir

    with ir.Context() as ctx, ir.Location.unknown():
        ctx.allow_unregistered_dialects = True
        attrs = ir.Module.parse(body).operation.attributes
        return ir.StringAttr(attrs["sym_name"]).value, ir.IntegerAttr(attrs["stable_mosaic.version"]).value


def vmem_error(what: str, key: str, need: int, chip: TpuChip, hint: str) -> ValueError:
    """The one-line refusal of tiles that cannot fit: names the config key, the chip and the VMEM."""
    return ValueError(
        f"{key}: {what} needs ~{need / MiB:.1f} MiB of VMEM, more than the {chip.kernel_vmem_budget / MiB:.1f} MiB "
        f"a kernel may plan for on TPU {chip.name} ({chip.vmem_bytes // MiB} MiB per core); {hint}")
