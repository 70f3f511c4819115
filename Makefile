# Everything a fresh machine needs: `make test` and `make demo` create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv lint test test-unit demo clean llama-cpp

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch 2.13.0 is on local disk here; a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev,demo,gguf]"
	touch $(STAMP)

# llama.cpp's converter (convert_hf_to_gguf.py + gguf-py) from the llama-cpp-python sdist, into
# ~/.cache/kobllla/llama.cpp-<version>/ (pip download; pip's cache has it after `make venv`). Once.
llama-cpp: $(STAMP)
	$(PY) -m tools.export_gguf --fetch-llama-cpp

# ruff (config in pyproject.toml) runs before the tests: a lint error fails `make test` and CI.
lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) llama-cpp lint
	$(PY) -m pytest -q

test-unit: $(STAMP)
	$(PY) -m pytest -q -m "not integration"

demo: $(STAMP)
	$(PY) -m tools.demo --run-dir runs/demo

clean:
	rm -rf runs/demo
