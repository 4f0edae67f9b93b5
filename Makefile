# Two set-up commands for a fresh machine (see README):
#   make demo   installs into .venv and runs the demo on the embedded corpus
#   make test   installs into .venv and runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch first where no NVIDIA GPU is present; a bare `torch` would pull a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0

.PHONY: setup demo test test-all bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	  $(PY) -m pip install -q -e '.[gpu,test,demo,bench,ray]'; \
	else \
	  $(PY) -m pip install -q '$(TORCH_CPU)' && $(PY) -m pip install -q -e '.[test,demo,bench,ray]'; \
	fi
	touch $@

demo: setup
	$(VENV)/bin/nda-ann demo --out results/demo

test: setup
	$(PY) -m pytest -q -rs

test-all: setup
	NDA_ANN_SLOW=1 $(PY) -m pytest -q -rs

clean:
	rm -rf results .pytest_cache
