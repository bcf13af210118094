#!/usr/bin/env bash
# fp32, bf16 mixed precision, bf16 weights and QLoRA (a 4-bit nf4 base) side by side: the same
# recipe (recipes/smollm2/combined.yaml: KL-to-base, EWC and the rest), STEPS steps each, then each
# run scored against its own base on general text (evals/smollm2_general.yaml). Prints one
# Markdown row per precision: seconds per step, final losses, retention. docs/precision.md.
#   STEPS=10 (default)   OUT=dir (default runs/precision)   ONLY=name: train that row again, print all
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-10}
OUT=${OUT:-runs/precision}
# name | overrides
ROWS=(
  "fp32       |"
  "bf16_mixed | train.bf16=true"
  "bf16       | model.dtype=bfloat16"
  "qlora_nf4  | model.load_in_4bit=true"
)
for row in "${ROWS[@]}"; do
  IFS='|' read -r name overrides <<< "$row"
  name=$(echo $name)
  [[ -n "${ONLY:-}" && "$name" != "$ONLY" ]] && continue
  echo "== $name: $overrides"
  # shellcheck disable=SC2086 # overrides are words
  workbench train recipes/smollm2/combined.yaml "name=$name" "train.max_steps=$STEPS" ${overrides} \
    --output-dir "$OUT/$name" > "$OUT.$name.log" 2>&1 || { tail -n 5 "$OUT.$name.log"; exit 1; }
  workbench eval --suite evals/smollm2_general.yaml --run "$OUT/$name" --out "$OUT/$name/results.json" \
    >> "$OUT.$name.log" 2>&1 || { tail -n 5 "$OUT.$name.log"; exit 1; }
done
python - "$OUT" "${ROWS[@]}" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| precision | s/step | vs fp32 | final train loss | eval_loss | base ppl | ppl ratio | KL/token |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
first = None
for row in sys.argv[2:]:
    name = row.split("|")[0].strip()
    run = json.loads((out / name / "run.json").read_text())
    metrics = {k: m["value"] for k, m in json.loads((out / name / "results.json").read_text())["entries"][0]["metrics"].items()}
    step = run["final"]["train_runtime"] / run["global_step"]
    first = first or step
    last = [h for h in run["history"] if "task_loss" in h][-1]
    print(f"| {name} | {step:.2f} | {step / first:.2f} | {last['task_loss']:.4f} | {run['final']['eval_loss']:.4f} | "
          f"{metrics['retention.general.ppl.base']:.3f} | {metrics['retention.general.ppl.ratio']:.4f} | "
          f"{metrics['retention.general.kl']:.4f} |")
EOF
