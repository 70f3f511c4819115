#!/usr/bin/env bash
# `attention: cudnn` through torchtune's lora_finetune_distributed (FSDP2) on a GPU: the tiny stage-1 config
# trained twice on the same data, once with flex attention (packed_collate, a BlockMask) and once with cuDNN's
# fused attention (packed_varlen_collate, document offsets), bf16, compiled; prints both loss curves.
# Run from the repo root on a CUDA machine (wheels from .whl/ as in bench/train_gpu.sh):
#   bash bench/cudnn_distributed_gpu.sh OUT_DIR [NPROC]
# Run once on an H100 (2026-12-06): flex trained, cudnn failed at step 1 (FSDP2 rebuilt the documents' dict from
# its items; fixed since, see docs/benchmarks.md); not rerun on a GPU after the fix. Its CPU twin is
# tests/test_cudnn_attention.py::test_the_distributed_recipe_trains_the_same_with_cudnn_attention (2 ranks, gloo).
set -eo pipefail
OUT=${1:?usage: bash bench/cudnn_distributed_gpu.sh OUT_DIR [NPROC]}
NPROC=${2:-1}
mkdir -p "$OUT"
source bench/gpu_wheels.sh
W=/tmp/kobllla-cudnn-dist
rm -rf "$W" && mkdir -p "$W"
python3 -m tools.make_tiny_model --out "$W/base" > "$W/make_model.log"
python3 -m tools.make_corpus --out "$W/data" > "$W/make_corpus.log"
python3 - "$W" <<'EOF'
import sys
w = sys.argv[1]
s = open("configs/tiny/stage1_kowiki_lora.yaml").read()
flex = s.replace("  packed: True\n", "  pack: True\ncollate_fn: kobllla.datasets.packed_collate\n", 1)
flex = flex.replace("_component_: torchtune.models.llama3.lora_llama3\n",
                    "_component_: kobllla.models.lora_llama3\n  attention: flex_inline\n")
open(f"{w}/flex.yaml", "w").write(flex)
cudnn = flex.replace("attention: flex_inline", "attention: cudnn").replace("packed_collate", "packed_varlen_collate")
open(f"{w}/cudnn.yaml", "w").write(cudnn)
EOF
for v in flex cudnn; do
  python3 -m torchtune._cli.tune run --nproc_per_node "$NPROC" lora_finetune_distributed --config "$W/$v.yaml" output_dir="$W/out-$v" \
    checkpointer.checkpoint_dir="$W/base" tokenizer.path="$W/base/original/tokenizer.model" \
    dataset.data_files="$W/data/ko_train.csv" device=cuda dtype=bf16 compile=True epochs=1 max_steps_per_epoch=20 \
    tokenizer.max_seq_len=512 > "$OUT/$v.log" 2>&1 || { echo "$v failed:"; tail -30 "$OUT/$v.log"; exit 1; }
  echo "$v: $(grep -ho 'loss:[0-9.]*' "$W/out-$v"/logs/*.txt | cut -d: -f2 | tr '\n' ' ')"
done
