# Everything a fresh machine needs: `make test` and `make demo` create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv lint test test-unit demo clean llama-cpp

venv: $(STAMP)

# llama.cpp (llama-cpp-python's sdist) built once for portable x86-64 (AVX2) into ~/.cache/kobllla/wheels:
# the default native build enables ggml's AMX backend on Sapphire Rapids and newer Xeons, whose q8_0/K-quant
# matmuls segfault there (ggml-org/llama.cpp#20824; seen here on every q8_0 GGUF). Elsewhere pip builds it.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
LLAMA_WHEELS := $(HOME)/.cache/kobllla/wheels/llama-cpp-python-$(LLAMA_CPP_VERSION)-avx2

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch 2.13.0 is on local disk here; a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	if [ "$$(uname -m)" = x86_64 ]; then \
	  if ! ls $(LLAMA_WHEELS)/*.whl >/dev/null 2>&1; then \
	    rm -rf $(LLAMA_WHEELS).tmp && \
	    CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" $(PY) -m pip wheel -q --no-deps --no-cache-dir -w $(LLAMA_WHEELS).tmp \
	      "llama-cpp-python==$(LLAMA_CPP_VERSION)" && mv $(LLAMA_WHEELS).tmp $(LLAMA_WHEELS); \
	  fi && $(PY) -m pip install -q --no-deps --force-reinstall $(LLAMA_WHEELS)/*.whl; \
	fi
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
