# Every target creates .venv with the pinned stack (pyproject.toml) when it is missing or stale, then acts.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m train.run

# The tests, then the fast benchmark subset (small shapes, guards on; bench/floors.toml [fast]).
test: $(STAMP)
	$(PY) -m pytest tests -q
	$(PY) -m pytest bench -q --benchmark-only --fast

# Every benchmark suite; figures in bench/results/summary.json, guards from bench/floors.toml [full].
# Each run is also saved under bench/results/history: BENCH_ARGS=--benchmark-compare compares with the last.
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) -m pytest bench -q --benchmark-only --benchmark-storage=bench/results/history \
		--benchmark-autosave $(BENCH_ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache .benchmarks
