# The README's two commands; each sets everything up first, then:
#   make bench   the headline comparison: the fused ops against the pure-PyTorch reference at
#                the maze and PTB sizes, speed and memory; prints the table, writes the plot
#   make test    the whole test suite
# The set-up alone is `make setup`: the active virtualenv, else ./.venv (created with $(PYTHON));
# VENV=path picks another. torch is installed, pinned ($(TORCH_PIN)), only into an environment
# that has none: an unpinned torch may fetch several GB of CUDA packages, and a torch that is
# there already is kept. Then this package, editable, with its extras, compiled against that
# torch (--no-build-isolation). A stamp under build/ skips the install until an input of the
# build changes, or the virtualenv is recreated.

PYTHON ?= python3
TORCH_PIN ?= torch==2.13.0
VENV ?= $(or $(VIRTUAL_ENV),.venv)
EXTRAS ?= test,experiments,bench
BENCH_ARGS ?= --cases maze,ptb --impls fused,eager --repeats 3
BENCH_OUT ?= runs/bench
PYTEST_ARGS ?=

VENV_PYTHON := $(VENV)/bin/python
# One stamp per virtualenv: several environments may use this checkout.
STAMP := build/make-setup$(subst /,-,$(abspath $(VENV)))
BUILD_INPUTS := Makefile setup.py pyproject.toml backpropamine_cuda/_build_config.py \
	$(shell find csrc -type f)
# The environment's tools (ninja for the extension's build, pytest) come first on PATH.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup bench test

setup: $(STAMP)

$(VENV)/pyvenv.cfg:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(VENV)/pyvenv.cfg $(BUILD_INPUTS)
	@$(VENV_PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10) and f"Python >= 3.10 is needed; $(VENV) has {sys.version.split()[0]}")'
	$(VENV_PYTHON) -c 'import torch' 2>/dev/null || $(VENV_PYTHON) -m pip install $(TORCH_PIN)
	$(VENV_PYTHON) -m pip install "setuptools>=64" wheel ninja
	$(VENV_PYTHON) -m pip install --no-build-isolation -e ".[$(EXTRAS)]"
	@mkdir -p $(@D) && touch $@

bench: setup
	$(VENV_PYTHON) benchmarks/bench_rnn.py $(BENCH_ARGS) --out $(BENCH_OUT)
	@if $(VENV_PYTHON) -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then \
		echo "A CUDA GPU is visible: the same comparison on it"; \
		$(VENV_PYTHON) benchmarks/bench_rnn.py $(BENCH_ARGS) --device cuda --out $(BENCH_OUT)/cuda; \
	else \
		echo "No CUDA GPU visible to torch: the comparison ran on the CPU only."; \
	fi

test: setup
	$(VENV_PYTHON) -m pytest python_tests $(PYTEST_ARGS)
