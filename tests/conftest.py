"""Shared fixtures.

torch_xla must be imported and its device created before any CPU autograd runs in the process,
otherwise backward on XLA tensors dies with a `device_ready_queues_` INTERNAL ASSERT
(DESIGN.md section 6). Tests do not control their order, so this happens at collection time, once
per session, before any test module runs; `xla_device` then hands out that device.
"""

import os

import pytest

os.environ.setdefault("PJRT_DEVICE", "CPU")
# JAX only lowers kernels here; off a TPU it must not probe for one (libtpu, installed for the TPU
# compile checks, would print warnings). train/runtime.py does the same for the trainer.
if os.environ["PJRT_DEVICE"].upper() != "TPU":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests run tiny graphs once: XLA:CPU's LLVM optimisation costs far more than it saves there
# (a 2-layer model's forward+backward compiled in ~20 s at the default level, ~6 s at 0 on the
# 2-core CI machine). Numerics are unchanged up to float reassociation. Set before torch_xla and
# jax read the variable; an explicit setting in XLA_FLAGS wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_backend_optimization_level=0").strip()
# The whole suite is one process, and every compiled XLA:CPU executable holds ~6 memory maps (JAX's ~3):
# torch_xla keeps 1,024 graphs by default, and the suite compiles more than ten thousand, so the process
# reached Linux's 65,530-map limit (vm.max_map_count) and died inside XLA (SIGSEGV/SIGABRT in a late
# test). Keep fewer graphs (no test needs more than a few dozen alive); JAX's caches are cleared per
# module below.
os.environ.setdefault("XLA_COMPILATION_CACHE_SIZE", "32")

# torch_xla is a pinned dependency: a broken install must fail the suite, not skip it.
import torch_xla  # noqa: E402

_XLA_DEVICE = torch_xla.device()


def pytest_addoption(parser):
    parser.addoption("--tpu-full", action="store_true", default=False,
                     help="tests/test_tpu_compile.py: compile the whole matrix (make tpu-check), not its CI subset")


@pytest.fixture(autouse=True, scope="module")
def _release_jax_executables():
    """After each test module: drop JAX's compiled executables (see XLA_COMPILATION_CACHE_SIZE above)."""
    yield
    import jax

    jax.clear_caches()


@pytest.fixture(scope="session")
def xla_device():
    """The torch_xla device (PJRT CPU here, TPU when present)."""
    return _XLA_DEVICE


def xla_sync():
    """Cut the lazy graph and run it (torch_xla 2.9: torch_xla.sync; older: mark_step)."""
    import torch_xla

    if hasattr(torch_xla, "sync"):
        torch_xla.sync()
    else:  # pragma: no cover
        import torch_xla.core.xla_model as xm

        xm.mark_step()


def packed_segments(length, rows):
    """int32 [len(rows), length] segment ids: row r holds segments of the lengths rows[r] (ids 1, 2, ...
    in order), then padding (0)."""
    import torch

    seg = torch.zeros(len(rows), length, dtype=torch.int32)
    for r, lengths in enumerate(rows):
        pos = 0
        for sid, n in enumerate(lengths, start=1):
            seg[r, pos:pos + n] = sid
            pos += n
    return seg


def jax_on_tpu() -> bool:
    """Whether JAX runs on a TPU here (the plain-JAX `tpu`-marked Mosaic tests skip otherwise). Not
    when torch_xla holds the TPU in this process (PJRT_DEVICE=TPU): there the kernels' parity runs
    through torch_xla instead (tests/test_tpu_parity.py)."""
    import jax

    if os.environ["PJRT_DEVICE"].upper() == "TPU":
        return False
    try:
        return jax.devices()[0].platform == "tpu"
    except RuntimeError:
        return False
