# `make demo` and `make test` set everything up first (a virtual environment in .venv).
# torch is installed on its own first and pinned, so that resolving the other packages never pulls a
# different (CUDA) build: on a machine without an NVIDIA GPU set TORCH_INDEX to a CPU-only wheel index if
# your default index would serve CUDA wheels.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e ".[dev]"
	$(PY) -c "import torch, genalign; print('genalign', genalign.__version__, 'torch', torch.__version__)"
	touch $@

demo: setup
	$(VENV)/bin/genalign-train experiment=digits_dro

test: setup
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) outputs .pytest_cache
