#!/usr/bin/env bash
# The regularization study: fine-tune SmolLM2-135M-Instruct on BIG-bench word_unscrambling under
# one recipe per regularizer, evaluate each against the base, gate each, and write the report.
#   QUICK=1  two recipes, fewer steps, a smaller suite (about 5 minutes)
#   OUT=dir  where runs, results and the report go (default runs/study, or runs/study-quick)
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${QUICK:-}" ]]; then
  OUT=${OUT:-runs/study-quick}
  RECIPES=(baseline kl_to_base)
  SUITE=evals/smollm2_quick.yaml
  TRAIN_ARGS=(train.max_steps=24 data.max_examples=384 train.eval_steps=12)
else
  OUT=${OUT:-runs/study}
  RECIPES=(baseline weight_decay lora_dropout label_smoothing kl_to_base ewc combined)
  SUITE=evals/smollm2.yaml
  TRAIN_ARGS=()
fi

echo "== assets: the embedded default model and the BIG-bench tasks (cached after the first run)"
workbench assets --suite "$SUITE"

RUNS=()
for recipe in "${RECIPES[@]}"; do
  echo "== train: recipes/smollm2/$recipe.yaml"
  workbench train "recipes/smollm2/$recipe.yaml" --output-dir "$OUT/$recipe" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}
  RUNS+=(--run "$OUT/$recipe")
done

echo "== eval: every recipe against the base ($SUITE)"
workbench eval --suite "$SUITE" "${RUNS[@]}" --out "$OUT/results.json"

echo "== gate: evals/gates/release.yaml"
for recipe in "${RECIPES[@]}"; do
  verdict=$(workbench gate "$OUT/results.json" --policy evals/gates/release.yaml --entry "$recipe" | tail -n 1) || true
  printf '%-16s %s\n' "$recipe" "${verdict#gate release: }"
done

workbench report "$OUT/results.json" --out "$OUT/report" > /dev/null
echo "$OUT/report/index.html"
