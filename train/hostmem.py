"""Host memory for XLA on the CPU: glibc's malloc on transparent huge pages.

XLA:CPU allocates a step's large temporaries afresh each execution, and glibc serves every buffer over
32 MiB (and smaller ones, depending on its heap) with a new mmap: the kernel then zero-fills it one 4 KiB
page fault at a time. A qwen3-0.6b step on 2 x 128 tokens took ~860,000 page faults (3.4 GB) and 15.6 s;
with glibc's `glibc.malloc.hugetlb=1` tunable (malloc asks for transparent huge pages, 2 MiB each) ~2,000
and 13.2 s (one core, this machine). A tunable is read when the process starts, so the entry points
(`python -m train.run`, `train.generate`, `train.evaluate`) re-execute themselves once with it set, before
torch is imported. PALLAS_DLM_HUGEPAGES=0 turns this off.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def wanted() -> bool:
    """Whether this process should (and can) run with the tunable: Linux with glibc, transparent huge
    pages not disabled, not turned off by PALLAS_DLM_HUGEPAGES=0, and not already set."""
    if os.environ.get("PALLAS_DLM_HUGEPAGES", "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    if TUNABLE in os.environ.get("GLIBC_TUNABLES", "") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return "[never]" not in THP_MODE.read_text()
    except OSError:
        return False


def environment() -> dict[str, str]:
    """This process's environment with the tunable added to GLIBC_TUNABLES."""
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES"), TUNABLE) if t)
    return env


def use_hugepage_malloc() -> None:
    """Re-execute this command with the tunable when wanted(). Call first thing in an entry point: after
    torch is imported a re-exec would pay for that import twice, so it is skipped then."""
    if not wanted() or "torch" in sys.modules:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), environment())


if __name__ == "__main__":  # `python -m train.hostmem`: what an entry point ends up with (tests use it)
    use_hugepage_malloc()
    print(os.environ.get("GLIBC_TUNABLES", ""))
