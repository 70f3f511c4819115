#!/usr/bin/env bash
# Stage-1 training benchmark at Llama-3-8B shape on one GPU: kobllla's stage-1 config through
# `tune run lora_finetune_single_device` vs transformers + peft, same checkpoint, same packs.
# Run from the repo root on a CUDA machine (H100/H200, >= 60 GB):
#   bash bench/train_gpu.sh OUT_DIR [more bench/train_gpu.py options]
# e.g. inside one 450-s device call: bash bench/train_gpu.sh $OUT --deadline-s 400 --extra-batch-size 2
# or the component variants on the same data (first = loss reference), no peer:
#   bash bench/train_gpu.sh $OUT --variants stock,fused,fp8 --steps 50 --peer-steps 0 --loss-micro
# Writes OUT_DIR/results.json, the recipe's and the peer's logs, and the recipe config used.
# Wheels (torchtune 0.6.1, torchao 0.14.1, ..., and nvidia-cudnn-frontend 1.16.0 for `attention: cudnn` from
# .whl/cudnn116/) are installed from .whl/ into /tmp/site when torchtune is not importable
# (bench/gpu_wheels.sh says how to fill .whl/); the peer runs with the machine's own transformers + peft and
# without /tmp/site on its path (peft refuses torchao < 0.16).
set -eo pipefail
OUT=${1:?usage: bash bench/train_gpu.sh OUT_DIR [options]}
shift
mkdir -p "$OUT"
source bench/gpu_wheels.sh
export TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
uptime
python3 bench/train_gpu.py --out "$OUT" --peer-pythonpath "" "$@" 2>&1 | tee "$OUT/driver.log"
