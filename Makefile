# Every target creates .venv with the pinned stack (pyproject.toml) when it is missing or stale, then acts.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench tpu-check install clean

$(STAMP): pyproject.toml plugins/lm_eval_hook/pyproject.toml plugins/lm_eval_hook/pallas_dlm_lm_eval_hook.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev,tpu-compile]' ./plugins/lm_eval_hook
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m train.run

# The tests, then the fast benchmark subset (small shapes, guards on; bench/floors.toml [fast]).
test: $(STAMP)
	$(PY) -m pytest tests -q
	$(PY) -m pytest bench -q --benchmark-only --fast

# Both kernels, forward and backward, compiled by libtpu for v4, v5e, v5p and v6e at every preset's and
# recipe's shapes (make test runs a subset), then the recipes' train steps compiled for their TPU slices:
# memory per chip, FLOPs and the roofline, written to bench/results/tpu_compile.json.
tpu-check: $(STAMP)
	$(PY) -m pytest tests/test_tpu_compile.py -q --tpu-full
	$(PY) -m train.tpu_report --json bench/results/tpu_compile.json

# Every benchmark suite; figures in bench/results/summary.json, guards from bench/floors.toml [full].
# Each run is also saved under bench/results/history: BENCH_ARGS=--benchmark-compare compares with the last.
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) -m pytest bench -q --benchmark-only --benchmark-storage=bench/results/history \
		--benchmark-autosave $(BENCH_ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache .benchmarks
