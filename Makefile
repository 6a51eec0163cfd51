# Set-up is two commands: `make demo` (runs the main job) and `make test` (runs the tests).
# Both create .venv and install what they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The torch requirement, optionally followed by pip options. Where pip is set up with a local
# CPU-wheel mirror (as on the project's machines) this pin installs the CPU build 2.13.0+cpu; from
# the public PyPI index on Linux it is the CUDA build (several GB of NVIDIA libraries). CPU only:
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# The requirement is quoted (so `torch>=2.3` works), the options after it are passed as they are.
TORCH_SPEC ?= torch==2.13.0
TORCH_REQUIREMENT := $(firstword $(TORCH_SPEC))
TORCH_PIP_OPTIONS := $(wordlist 2,$(words $(TORCH_SPEC)),$(TORCH_SPEC))

.PHONY: setup setup-demo setup-tfds demo test test-fast parity bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# The demo needs the package alone: no torch (only conversion, parity and Inception .pth weights
# import it), no test servers.
$(VENV)/.installed-demo: pyproject.toml | $(PY)
	$(PIP) install -q -e .
	touch $@

# Everything the tests, `make parity` and `make bench` use: torch (TORCH_SPEC) and the dev extra.
# One pip command for torch and the extras: the dev extra's pytorch-fid needs torchvision, and each
# torchvision release pins one torch release; resolved together, pip picks the torchvision that
# matches TORCH_SPEC's torch. A second command could instead pick the newest torchvision and
# replace the torch just installed with the one it pins (or a CUDA build of it).
# k-diffusion (the published DPM-Solver++ the tests compare with) without its dependencies: they
# pull a CUDA torchvision, CLIP, wandb and more that its samplers never use (tests/test_solvers.py).
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -q "$(TORCH_REQUIREMENT)" $(TORCH_PIP_OPTIONS) -e ".[torch,dev]"
	$(PIP) install -q --no-deps "k-diffusion==0.1.1.post1"
	touch $@

# TensorFlow + TFDS: only needed to PREPARE TFDS datasets (and by the tests of that path).
$(VENV)/.installed-tfds: $(VENV)/.installed
	$(PIP) install -q -e ".[torch,tfds,keras,dev]"
	touch $@

setup: $(VENV)/.installed
setup-demo: $(VENV)/.installed-demo
setup-tfds: $(VENV)/.installed-tfds

demo: setup-demo
	$(VENV)/bin/ddim-jax demo --workdir outputs/demo

# --maxschedchunk 1: xdist hands each worker one test at a time (the longest first, tests/conftest.py),
# so neither worker ends minutes before the other.
test: setup-tfds
	$(PY) -m pytest -q -n 2 --maxschedchunk 1 tests

# The fast tier (tests not marked slow): about a minute once installed.
test-fast: setup-tfds
	$(PY) -m pytest -q -n 2 --maxschedchunk 1 -m "not slow" tests

parity: setup
	$(PY) scripts/parity_report.py
	$(PY) scripts/parity_report.py --variant r

# JAX vs torch eager vs torch.compile throughput with the script's CPU defaults (32x32, batch 32);
# e.g. `make bench BENCH_ARGS="--json out.json"` passes options through.
bench: setup
	$(PY) scripts/benchmark.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
