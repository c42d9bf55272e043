"""pytest plumbing of the benchmarks: the `record_figure` fixture, the fast subset, the summary.

    pytest bench --benchmark-only            the full suites (make bench)
    pytest bench --benchmark-only --fast     the CI subset: tests marked `fast`, small shapes, the
                                             [fast] floors; results under bench/results/fast/

Every figure recorded with `record_figure(name, value, unit="", note="")` goes into
bench/results/summary.json ({name: value}; units, notes, bounds and status in summary_details.json,
the table in summary.txt) and is checked against bench/floors.toml: a figure outside its bound
fails the test that recorded it, naming the figure, its value and the bound. The table of the
session's figures is printed at the end. pytest-benchmark's own JSON goes to
bench/results/benchmark.json unless --benchmark-json says otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench import harness


def pytest_addoption(parser):
    group = parser.getgroup("pallas-dlm bench")
    group.addoption("--fast", action="store_true", default=False,
                    help="run the fast subset (tests marked fast) at small shapes with the [fast] "
                         "floors of bench/floors.toml (also: BENCH_FAST=1)")


def _fast(config) -> bool:
    return bool(config.getoption("--fast", default=False)) or os.environ.get("BENCH_FAST") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "fast: part of the fast benchmark subset (CI: make test)")
    harness.set_size("fast" if _fast(config) else "full")
    harness.child_environment()
    if getattr(config.option, "benchmark_json", "absent") is None:
        out = harness.results_dir()
        out.mkdir(parents=True, exist_ok=True)
        config.option.benchmark_json = Path(out / "benchmark.json")


def pytest_collection_modifyitems(config, items):
    if not _fast(config):
        return
    keep, drop = [], []
    for item in items:
        (keep if item.get_closest_marker("fast") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def bench_fast() -> bool:
    """True in the fast subset (small shapes), False in the full suites."""
    return harness.is_fast()


class _Recorder:
    """record_figure(name, value, unit="", note=""): record a figure and check its bound."""

    def __call__(self, name: str, value: float, unit: str = "", note: str = "") -> None:
        message = harness.record(name, value, unit, note)
        if message:
            pytest.fail(message, pytrace=False)

    def many(self, figures) -> None:
        """Record several (name, value, unit, note) figures, then fail once with every violation,
        so one figure out of bounds does not keep the others out of the summary."""
        messages = [harness.record(*fig) for fig in figures]
        messages = [m for m in messages if m]
        if messages:
            pytest.fail("\n".join(messages), pytrace=False)


@pytest.fixture
def record_figure():
    """Callable `record_figure(name: str, value: float, unit: str = "", note: str = "")`: puts the
    figure into bench/results/summary.json and the printed table, and checks it against
    bench/floors.toml when the file has an entry for that name (the test fails if it is out of
    bounds). `record_figure.many([(name, value, unit, note), ...])` records several first."""
    return _Recorder()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not harness.FIGURES:
        return
    tr = terminalreporter
    tr.section(f"pallas-dlm figures ({harness.size()}; bounds: bench/floors.toml "
               f"[{harness.section()}])")
    for line in harness.table().splitlines():
        tr.write_line(line)
    tr.write_line(f"written to {harness.results_dir().relative_to(harness.ROOT)}/summary.json")
