# Set-up is two commands: `make demo` (runs the main job) and `make test` (runs the tests).
# Both create .venv and install what they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of torch; a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup setup-tfds demo test parity bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[torch,dev]"
	touch $@

# TensorFlow + TFDS: only needed to PREPARE TFDS datasets (and by the tests of that path).
$(VENV)/.installed-tfds: $(VENV)/.installed
	$(PIP) install -q -e ".[torch,tfds,dev]"
	touch $@

setup: $(VENV)/.installed
setup-tfds: $(VENV)/.installed-tfds

demo: setup
	$(VENV)/bin/ddim-jax demo --workdir outputs/demo

test: setup-tfds
	$(PY) -m pytest -q -n 2 tests

parity: setup
	$(PY) scripts/parity_report.py
	$(PY) scripts/parity_report.py --variant r

# JAX vs torch eager vs torch.compile throughput with the script's CPU defaults (32x32, batch 32);
# e.g. `make bench BENCH_ARGS="--json out.json"` passes options through.
bench: setup
	$(PY) scripts/benchmark.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
