#!/usr/bin/env bash
# GPU throughput, MFU and "recipe vs inner loop" in one go, about 8 minutes on one H100/H200:
#
#     bash benchmarks/gpu.sh OUT_DIR            # writes OUT_DIR/gpu.md, OUT_DIR/*.json, logs
#
# 1. benchmarks/throughput.py (bf16, SDPA) for randomly initialised BERT models of three sizes
#    (MiniLM-L6, bert-base, bert-large; built by benchmarks/random_bert.py into $MODELS, default
#    OUT_DIR/models, unless there) at 64 examples / 22 packed rows and 224 examples / 72 rows of
#    128 tokens: hf_baseline, padded_sparse, packed, packed_sparse and the recipe's own step;
# 2. the recipe itself, `accelerate launch recipes/mlm.py`, bf16, 72 packed rows of 128, for
#    bert-base and bert-large, eager, --torch_compile true, and with --torch_compile_mode
#    reduce-overhead (CUDA graphs); a variant that fails is reported and skipped: steady-state real tokens/s,
#    train/tflops and train/mfu from its metrics.jsonl (log windows after the first two);
# 3. OUT_DIR/gpu.md: the tables (benchmarks/gpu_report.py).
# Environment: MODELS (model folder), STEPS (timed steps per mode, default 20), RECIPE_STEPS
# (default 100), SIZES / RECIPE_SIZES / COMPILE_VARIANTS (what runs), TOKENIZER (for the models; default the
# embedded one), PRECISION (bf16; "no" for fp32), PYTHON.
set -euo pipefail
out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
models=${MODELS:-$out/models}
steps=${STEPS:-20}
recipe_steps=${RECIPE_STEPS:-100}
precision=${PRECISION:-bf16}  # "no": fp32 (a CPU dry run of this script: bf16 is slow there)
bf16=$([ "$precision" = bf16 ] && echo --bf16 || true)
mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
sizes=${SIZES-minilm bert-base bert-large}
recipe_sizes=${RECIPE_SIZES-bert-base bert-large}
needed=$(echo $sizes $recipe_sizes | tr ' ' '\n' | sort -u | paste -sd, -)
[ -z "$needed" ] || "$py" "$root/benchmarks/random_bert.py" "$models" --sizes "$needed" \
  ${TOKENIZER:+--tokenizer "$TOKENIZER"}

for size in $sizes; do
  for shape in "64 22" "224 72"; do
    set -- $shape
    "$py" "$root/benchmarks/throughput.py" $bf16 --steps "$steps" --batch_size "$1" \
      --packed_rows "$2" --model_name_or_path "$models/$size" \
      --modes hf_baseline,padded_sparse,packed,packed_sparse,recipe \
      --output "$out/throughput-$size-$1.json" 2>&1 | grep -v -i "warn" | tail -12
  done
done
for compile in ${COMPILE_VARIANTS-false default reduce-overhead}; do  # eager; compiled; + CUDA graphs
  for size in $recipe_sizes; do
    run="$out/recipe-$size-compile-$compile"
    flags=(--torch_compile false)
    [ "$compile" = false ] || flags=(--torch_compile true --torch_compile_mode "$compile")
    if "$py" -m accelerate.commands.launch --num_processes 1 --num_machines 1 \
      --mixed_precision "$precision" --dynamo_backend no "$root/recipes/mlm.py" \
      --model_name_or_path "$models/$size" --padding packed --max_seq_length 128 \
      --per_device_train_batch_size 72 --max_train_steps "$recipe_steps" --logging_steps 10 \
      --learning_rate 1e-4 --max_eval_samples 256 --fill_mask_check false --report_to none \
      --progress_bar false "${flags[@]}" --output_dir "$run" --overwrite_output_dir true \
      > "$run.log" 2>&1; then
      grep -E "^(train|done)" "$run.log" || true
      rm -rf "$run/model"  # the exported weights: not needed for the numbers
    else
      echo "recipe $size --torch_compile $compile failed:"; tail -15 "$run.log"
    fi
  done
done
"$py" "$root/benchmarks/gpu_report.py" "$out" | tee "$out/gpu.md"
