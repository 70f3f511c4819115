#!/usr/bin/env bash
# Issue 14 items 3 and 4, where the seconds go on the GPU host (one device call, ~9 min):
#   bash bench/diag_gpu.sh OUT_DIR
# 1. the image's bytecode state and bare import times (python, torch, CUDA, sympy, lm_eval's HF model);
# 2. MC2 at the 8B shape through bench/mc2_timeline.py (start, main, exit; default / full_exit / bg_imports),
#    then plain `lm_eval --model hf` once for the reference MC2 and its time (the bytecode of the carried wheels
#    is compiled by the import probes first, as pip compiles it at install);
# 3. the disk read cold by pattern (bench/disk_probe.py) and the chat vector's default command alternated
#    with --workers 16 (bench/chat_vector_bench.py cold --ab-flags).
# The 8B model (bench/train_gpu.py's random checkpoint, seed 0) and the chat vector's output live in
# /dev/shm; the chat vector's 48 GB of inputs on the disk.
set -o pipefail
OUT=${1:?usage: bash bench/diag_gpu.sh OUT_DIR}
mkdir -p "$OUT"
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python3 - <<'PY'
import importlib.util, os
for name in ("sympy", "sklearn", "transformers", "torch", "numpy"):
    d = os.path.dirname(importlib.util.find_spec(name).origin)
    pc = os.path.join(d, "__pycache__")
    print(name, d, "pyc files:", len(os.listdir(pc)) if os.path.isdir(pc) else 0, "writable:", os.access(d, os.W_OK))
PY
for cmd in "import torch; torch.zeros(1, device='cuda')" "import transformers.modeling_utils"; do
  for k in 1; do
    s=$(date +%s.%N); python3 -c "$cmd"; e=$(date +%s.%N)
    python3 -c 'import sys; print(f"import probe {sys.argv[1]}: {float(sys.argv[3]) - float(sys.argv[2]):6.2f} s  {sys.argv[4]}")' \
      "$k" "$s" "$e" "$cmd"
  done
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site
for k in 1 2; do
  s=$(date +%s.%N); python3 -c "import lm_eval.models.huggingface, lm_eval.tasks, kobllla.evaluation._shared_prefix"; e=$(date +%s.%N)
  python3 -c "print(f'import probe {$k}: {$e - $s:6.2f} s  lm_eval HF model + tasks + our scorer')"
done
el "imports probed"
M=/dev/shm/llama3-8b-seed0
python3 -c "
import sys; from pathlib import Path; sys.path.insert(0, 'bench')
from train_gpu import write_random_checkpoint
print(write_random_checkpoint(Path('$M'), preset='llama3-8b', device='cuda', seed=0))" | tail -1
python3 -m eval.bench_mc2 --out /tmp/mc2 > /dev/null
el "model written"
python3 bench/mc2_timeline.py --model $M --bench-dir /tmp/mc2 --out /tmp/mc2/tl --variants default,full_exit,bg_imports \
  --repeat 1 --importtime --budget-s 150 | tee "$OUT/mc2_timeline.jsonl"
s=$(date +%s.%N)
python3 -m lm_eval --model hf --model_args "pretrained=$M,dtype=bfloat16" --tasks truthfulqa_mc2 \
  --include_path /tmp/mc2/tasks --batch_size auto --device cuda:0 --output_path /tmp/mc2/lm_eval > /tmp/mc2/lm_eval.log 2>&1
python3 - /tmp/mc2 "$(python3 -c "print(f'{$(date +%s.%N) - $s:.1f}')")" <<'PY' | tee -a "$OUT/mc2_timeline.jsonl"
import glob, json, sys
ref = json.load(open(sorted(glob.glob(f"{sys.argv[1]}/lm_eval/*/results_*.json"))[-1]))["results"]["truthfulqa_mc2"]["acc,none"]
print(json.dumps({"run": "plain lm_eval --model hf, batch auto", "wall_s": float(sys.argv[2]), "mc2": ref}))
PY
el "mc2 done"
rm -rf $M
W=/root/cvbench
python3 bench/chat_vector_bench.py cold --work $W --out-dir /dev/shm --preset llama3-8b --budget-s 0 > /dev/null 2>&1 || true
el "cv inputs written"
python3 bench/disk_probe.py $W/base/model-0000[12]-of-*.safetensors $W/instruct/model-0000[12]-of-*.safetensors \
  $W/target/model-0000[12]-of-*.safetensors --limit-gb 15 --patterns 8x2,16x8,cat | tee "$OUT/disk.jsonl"
el "disk probed"
LEFT=$(( 560 - ($(date +%s) - T0) ))
PYTHONPATH=. python3 bench/chat_vector_bench.py cold --work $W --out-dir /dev/shm --preset llama3-8b --reuse-inputs \
  --ab-flags "--workers 16" --budget-s $(( LEFT - 40 )) | tee "$OUT/cv.jsonl"
el "done"
