#!/usr/bin/env bash
# GPU timing of TruthfulQA MC2 on an 8B-shape random Llama 3: plain `lm_eval --model hf` vs
# `python -m eval.run --scorer shared_prefix`, same data, same page-cached weights, one process each.
# Run from the repo root on a CUDA machine: bash eval/bench_mc2_gpu.sh OUT_DIR
# (wheels for lm_eval & co. are installed from .whl/ when lm_eval is not importable).
# MODEL_DIR=an existing HF checkpoint of the 8B shape skips making one (e.g. bench/train_gpu.py's).
# The second eval.run runs under `python -X importtime` (OUT_DIR/importtime.txt): where start-up goes.
set -eo pipefail
OUT=${1:?usage: bash eval/bench_mc2_gpu.sh OUT_DIR}
M=${MODEL_DIR:-/tmp/kobllla-bench/llama3-8b}
B=${BENCH_DIR:-/tmp/kobllla-bench/data}
mkdir -p "$OUT"
if ! python3 -c "import lm_eval" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, lm_eval, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lm_eval', lm_eval.__version__, 'datasets', datasets.__version__)"
nproc; free -g | head -2
[ -d "$M" ] || { s=$(date +%s); python3 -m tools.make_tiny_model --out "$M" --preset llama3-8b --dtype bfloat16; echo "made model in $(( $(date +%s) - s )) s"; }
python3 -m eval.bench_mc2 --out "$B"
cat "$M"/*.safetensors > /dev/null  # both runs read the weights from page cache
stamp() { date +%s.%N; }
t0=$(stamp)
python3 -m lm_eval --model hf --model_args "pretrained=$M,dtype=bfloat16" --tasks truthfulqa_mc2 \
  --include_path "$B/tasks" --batch_size auto --device cuda:0 --output_path "$OUT/lm_eval" 2>&1 | grep -v "it/s]" | tail -8
t1=$(stamp)
python3 -m eval.run --model "bench=$M" --task truthfulqa_mc2 --data-dir "$B/data" --device cuda \
  --scorer shared_prefix --results-dir "$OUT/ours" > "$OUT/ours.log" 2>&1
t2=$(stamp)
grep -v "it/s]" "$OUT/ours.log" | tail -3 || true
python3 -X importtime -m eval.run --model "bench=$M" --task truthfulqa_mc2 --data-dir "$B/data" --device cuda \
  --scorer shared_prefix --results-dir "$OUT/ours2" 2> "$OUT/importtime.txt" | tail -1
t3=$(stamp)
grep -v "^import time:" "$OUT/importtime.txt" | grep -v "it/s]" | tail -3 || true
echo "slowest imports (cumulative us):"; { grep "^import time:" "$OUT/importtime.txt" | sort -t'|' -k2 -n -r | head -25; } || true
echo "second eval.run --scorer shared_prefix: $(python3 -c "print(f'{$t3 - $t2:.1f}')") s wall"
python3 - "$t0" "$t1" "$t2" "$OUT" <<'PY'
import glob, json, sys
t0, t1, t2, out = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
ref = json.load(open(sorted(glob.glob(f"{out}/lm_eval/*/results_*.json"))[-1]))["results"]["truthfulqa_mc2"]["acc,none"]
run = json.load(open(sorted(glob.glob(f"{out}/ours/runs/*.json"))[-1]))
ours = run["tasks"]["truthfulqa_mc2"]["metrics"]["acc"]["value"]
print(f"plain lm_eval --model hf: {t1 - t0:.1f} s wall, MC2 {ref:.6f}")
print(f"eval.run --scorer shared_prefix: {t2 - t1:.1f} s wall, MC2 {ours:.6f}, timing {run['timing']}")
print(f"|MC2 difference| = {abs(ours - ref):.2e}")
PY
