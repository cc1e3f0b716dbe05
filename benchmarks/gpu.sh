#!/usr/bin/env bash
# One GPU session (one H100/H200, bf16), ordered by value, every run under its own timeout and
# the whole under a budget, each result written as soon as it exists:
#
#     bash benchmarks/gpu.sh OUT_DIR          # mlmkit installed; random models into OUT_DIR/models
#     MODELS=/tmp bash .gpu/run.sh bash benchmarks/gpu.sh OUT_DIR  # a machine staged by stage.sh
#
# Models: randomly initialised BERT of three sizes (minilm, bert-base, bert-large) with the
# embedded tokenizer, built by benchmarks/random_bert.py into MODELS unless there (.gpu/run.sh
# builds them into /tmp). Results: OUT_DIR/gpu.md (benchmarks/gpu_report.py,
# rewritten after every run), OUT_DIR/status.txt (one line per run: exit status, seconds),
# check-*.json, throughput-*.json, recipe-*/ (metrics.jsonl, summary.json), *.log.
#
#  1. check-varlen: packed BERT rows, varlen kernel vs the dense block mask (bf16); if it fails,
#     every run below names --attn_implementation sdpa (the dense block mask) instead
#  2. recipe bert-base, 256 rows of 128, graphed (--torch_compile reduce-overhead: static shapes,
#     CUDA graphs, varlen attention)
#  3. throughput.py bert-base 128 x 256 rows: hf_baseline and the compiled inner loop
#  4. check-graphed: the graphed step's bf16 losses against the eager step's
#  5. pytest tests/unit/train/test_step_sync.py on CUDA (no host sync: block mask, varlen, graphed;
#     without pytest in the image: gpu_checks.py sync runs its CUDA test directly)
#  6. the Hugging Face comparison's shapes (224 / 72 and 64 / 22 rows of 128): throughput
#     compiled (hf_baseline, packed_sparse)
#  7. bert-base 512 x 64 rows: recipe graphed, throughput
#  8. bert-large 128 x 256 rows: recipe graphed, throughput
#  9. comparisons: recipe bert-base 128 x 256 eager, 72 rows graphed and eager
# 10. the other encoders' packed paths in bf16 (throughput.py --shape: scaled-down ModernBERT,
#     ESM-2, DeBERTa-v3; mlmkit_packed through the varlen kernel, DeBERTa's 3-D block mask)
#
# Environment: BUDGET_S (seconds for the whole script, default 450: the session's ~9 minutes
# less run.sh's set-up), MODELS (folder of minilm/ bert-base/ bert-large/, default OUT_DIR/models),
# STEPS (timed steps per throughput mode, default 30), RECIPE_STEPS (default 60: six log windows
# of 10, the first two left out of the steady state), PRECISION (bf16; "no" for a CPU dry run),
# ONLY (space-separated run names to run, default all), PYTHON.
# CPU dry run:  PRECISION=no MODELS=<tiny models: random_bert.py --tiny> STEPS=2 RECIPE_STEPS=4 \
#               ROWS_SCALE=16 bash benchmarks/gpu.sh /tmp/out
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
budget=${BUDGET_S:-450}
steps=${STEPS:-30}
recipe_steps=${RECIPE_STEPS:-60}
precision=${PRECISION:-bf16}
scale=${ROWS_SCALE:-1}  # divides every batch (a CPU dry run)
bf16=$([ "$precision" = bf16 ] && echo --bf16 || true)
mkdir -p "$out"
out=$(cd "$out" && pwd)
models=${MODELS:-$out/models}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 \
       WANDB_MODE=disabled
[ -d "$root/.gpu/tok" ] && export MLMKIT_TEST_TOKENIZER=${MLMKIT_TEST_TOKENIZER:-$root/.gpu/tok}
for size in minilm bert-base bert-large; do  # built here unless there (not counted in the budget)
  [ -f "$models/$size/config.json" ] || "$py" "$root/benchmarks/random_bert.py" "$models" \
    --sizes minilm,bert-base,bert-large ${MLMKIT_TEST_TOKENIZER:+--tokenizer "$MLMKIT_TEST_TOKENIZER"} \
    || exit 1
done
start=$SECONDS
{ echo "# $(date -u +%FT%TZ) budget ${budget}s"; nvidia-smi --query-gpu=name,memory.total \
  --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"; } >> "$out/status.txt"

report() { "$py" "$root/benchmarks/gpu_report.py" "$out" > "$out/gpu.md.tmp" 2>> "$out/report.log" \
  && mv "$out/gpu.md.tmp" "$out/gpu.md"; }

# run NAME LIMIT_S COMMAND...: its own timeout (cut to what is left of the budget), its log in
# OUT/NAME.log, a status line, the report rewritten
run() {
  local name=$1 limit=$2 t0=$SECONDS rc; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  local left=$(( budget - (SECONDS - start) ))
  if (( left < 30 )); then echo "$name skipped: ${left}s of the budget left" | tee -a "$out/status.txt"; return 0; fi
  (( limit > left )) && limit=$left
  echo "== $name (limit ${limit}s, ${left}s left)"
  timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(( SECONDS - t0 ))s$( (( rc == 124 || rc == 137 )) && echo ' TIMEOUT')" \
    | tee -a "$out/status.txt"
  grep -E "^(train|done|compiled|  [a-z_]+ +[0-9]|\{\"check)" "$out/$name.log" | tail -8 || true
  (( rc == 0 )) || tail -5 "$out/$name.log"
  rm -rf "$out/$name/model" "$out/$name/model.initial" "$out/$name/checkpoints"  # not needed
  report
  return $rc
}

rows() { echo $(( $1 / scale > 0 ? $1 / scale : 1 )); }

# recipe NAME SIZE ROWS WIDTH COMPILE(false|reduce-overhead) LIMIT
recipe() {
  local name=$1 size=$2 n=$(rows "$3") width=$4 compile=$5 limit=$6 flags
  flags=(--torch_compile false)
  [ "$compile" = false ] || flags=(--torch_compile true --torch_compile_mode "$compile")
  run "$name" "$limit" "$py" -m accelerate.commands.launch --num_processes 1 --num_machines 1 \
    --mixed_precision "$precision" --dynamo_backend no "$root/recipes/mlm.py" \
    --model_name_or_path "$models/$size" --padding packed --max_seq_length "$width" \
    --per_device_train_batch_size "$n" --max_train_steps "$recipe_steps" --logging_steps 10 \
    --learning_rate 1e-4 --max_eval_samples 256 --fill_mask_check false --report_to none \
    --eval_pad_sensitivity false --progress_bar false "${flags[@]}" ${attn[@]+"${attn[@]}"} \
    --output_dir "$out/$name" --overwrite_output_dir true
}

# throughput NAME SIZE EXAMPLES ROWS WIDTH MODES LIMIT [more flags]
throughput() {
  local name=$1 size=$2 batch=$(rows "$3") n=$(rows "$4") width=$5 modes=$6 limit=$7
  shift 7
  run "$name" "$limit" "$py" "$root/benchmarks/throughput.py" $bf16 --steps "$steps" \
    --warmup 3 --batch_size "$batch" --packed_rows "$n" --max_seq_length "$width" \
    --model_name_or_path "$models/$size" --modes "$modes" --output "$out/$name.json" \
    ${attn[@]+"${attn[@]}"} "$@"
}
graphed=(--torch_compile --torch_compile_mode reduce-overhead)

# 1-5: the fast path at the shape users train, its inner loop and baseline, its correctness
attn=()  # the varlen path, unless its check fails: then every run keeps the dense block mask
if ! run check-varlen 90 "$py" "$root/benchmarks/gpu_checks.py" varlen "$models/bert-base" \
    "$out/check-varlen.json"; then
  attn=(--attn_implementation sdpa)
  echo "check-varlen failed: the runs below use --attn_implementation sdpa" | tee -a "$out/status.txt"
fi
recipe recipe-bert-base-128x256-graphed bert-base 256 128 reduce-overhead 200
throughput throughput-bert-base-128x256 bert-base 800 256 128 hf_baseline,packed_sparse 180 \
  "${graphed[@]}"
run check-graphed 120 "$py" "$root/benchmarks/gpu_checks.py" graphed "$models/minilm" \
  "$out/check-graphed.json"
if "$py" -c "import pytest" 2>/dev/null; then
  run pytest-step-sync 120 "$py" -m pytest -p no:cacheprovider -q "$root/tests/unit/train/test_step_sync.py"
else  # the image has no pytest: the CUDA test's variants run directly
  run check-sync 120 "$py" "$root/benchmarks/gpu_checks.py" sync "$models/minilm" \
    "$out/check-sync.json"
fi
# 6: the step-count shapes of the Hugging Face comparison (224 and 64 examples per step)
throughput throughput-bert-base-128x72 bert-base 224 72 128 hf_baseline,packed_sparse 150 \
  "${graphed[@]}"
throughput throughput-bert-base-128x22 bert-base 64 22 128 hf_baseline,packed_sparse 150 \
  "${graphed[@]}"
# 7-8: long rows; bert-large
recipe recipe-bert-base-512x64-graphed bert-base 64 512 reduce-overhead 180
throughput throughput-bert-base-512x64 bert-base 800 64 512 hf_baseline,packed_sparse 180 \
  "${graphed[@]}"
recipe recipe-bert-large-128x256-graphed bert-large 256 128 reduce-overhead 240
throughput throughput-bert-large-128x256 bert-large 800 256 128 hf_baseline,packed_sparse 240 \
  "${graphed[@]}"
# 9: comparisons
recipe recipe-bert-base-128x256-eager bert-base 256 128 false 120
recipe recipe-bert-base-128x72-graphed bert-base 72 128 reduce-overhead 180
recipe recipe-bert-base-128x72-eager bert-base 72 128 false 120
throughput throughput-bert-base-128x256-eager bert-base 800 256 128 packed_sparse,recipe 150
# 10: the other encoders (their own attention paths: no --attn_implementation fallback here)
for shape in modernbert esm2 deberta-v3; do
  run "throughput-$shape-128x64" 90 "$py" "$root/benchmarks/throughput.py" $bf16 \
    --steps "$steps" --warmup 3 --batch_size "$(rows 200)" --packed_rows "$(rows 64)" \
    --max_seq_length 128 --shape "$shape" --modes hf_baseline,padded,packed_sparse \
    ${MLMKIT_TEST_TOKENIZER:+--tokenizer_name "$MLMKIT_TEST_TOKENIZER"} \
    --output "$out/throughput-$shape-128x64.json"
done
echo "done in $(( SECONDS - start ))s" | tee -a "$out/status.txt"
report
cat "$out/gpu.md"
