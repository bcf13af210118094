#!/usr/bin/env bash
# The regularization study: fine-tune SmolLM2-135M-Instruct on BIG-bench word_unscrambling under
# each regularizer at two strengths, and the baseline at two learning rates and two seeds; score
# every run's final adapter, its adapter scales and its checkpoints against the base; compare each
# recipe with the front that training less gives for free (workbench compare); gate; report.
#   PROFILE=full   every regularizer at two strengths, seeds for baseline, KL and EWC (the first
#                  study; `make study` now runs the grid across models and tasks, scripts/grid.py)
#   PROFILE=demo   the baseline at two learning rates, KL-to-base and EWC at one strength (make demo)
#   PROFILE=quick  baseline and KL-to-base, 20 steps, a smaller suite (make demo QUICK=1)
#   OUT=dir        where runs, results and the report go (default runs/study-PROFILE)
#   ONLY="a b"     only these rows of the profile (the reference rows must be among them)
# A killed study resumes: runs whose run.json says "completed" are not trained again.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-demo}

# name | recipe (recipes/smollm2/) | overrides. A name is its own family (one strength, pooled
# over seeds); "family=" pools another seed or a lower learning rate into it.
FULL=(
  "baseline         | baseline        |"
  "baseline_s1      | baseline        | family=baseline train.seed=1"
  "baseline_lr_low  | baseline_lr_low |"
  "kl_to_base_w0.1  | kl_to_base      | regularizers.kl_to_base.weight=0.1"
  "kl_to_base_w1    | kl_to_base      |"
  "kl_to_base_w1_s1 | kl_to_base      | family=kl_to_base_w1 train.seed=1"
  "ewc_w1e3         | ewc             | regularizers.ewc.weight=1000"
  "ewc_w1e4         | ewc             |"
  "ewc_w1e4_s1      | ewc             | family=ewc_w1e4 train.seed=1"
  "delta_l2_w1e-3   | delta_l2        | regularizers.delta_l2.weight=0.001"
  "delta_l2_w1e-2   | delta_l2        | regularizers.delta_l2.weight=0.01"
  "lora_dropout_0.1 | lora_dropout    |"
  "lora_dropout_0.3 | lora_dropout    | regularizers.lora_dropout=0.3"
  "label_smoothing_0.1 | label_smoothing |"
  "label_smoothing_0.3 | label_smoothing | regularizers.label_smoothing=0.3"
  "replay_0.2       | replay          |"
  "replay_0.5       | replay          | data.replay.ratio=0.5"
  "kl_budget        | kl_budget       |"
  "budget_select    | budget_select   | train.save_steps=5"
  "baseline_s2      | baseline        | family=baseline train.seed=2"
  "baseline_lr2e-4  | baseline        | family=baseline train.learning_rate=2e-4"
  "dft              | dft             |"
  "dft_lr2e-4       | dft             | train.learning_rate=2e-4"
  "anchored_sft     | anchored_sft    |"
  "lora_corda_kpm   | lora_corda_kpm  |"
  "lora_corda_kpm_lr2e-4    | lora_corda_kpm | train.learning_rate=2e-4"
  "lora_corda_kpm_lr2e-4_s1 | lora_corda_kpm | family=lora_corda_kpm_lr2e-4 train.learning_rate=2e-4 train.seed=1"
  "lora_mlp_only    | lora_mlp_only   |"
)
DEMO=(
  "baseline         | baseline        |"
  "baseline_lr_low  | baseline_lr_low |"
  "kl_to_base_w1    | kl_to_base      |"
  "ewc_w1e4         | ewc             |"
)
QUICK=(
  "baseline         | baseline        |"
  "kl_to_base_w1    | kl_to_base      |"
)
# A checkpoint half way traces each run's trajectory; the suite scores it (a light point).
TRAIN_ARGS=(train.save_steps=20)
SUITE=evals/smollm2.yaml
FORGETTING=(retention.general.ppl.ratio retention.general.kl retention.mc.all.acc.delta)
case "$PROFILE" in
  full) GRID=("${FULL[@]}") ;;
  demo) GRID=("${DEMO[@]}") ;;
  quick) GRID=("${QUICK[@]}"); SUITE=evals/smollm2_quick.yaml
         TRAIN_ARGS=(train.max_steps=20 data.max_examples=320 train.eval_steps=10 train.save_steps=10) ;;
  *) echo "error: PROFILE=$PROFILE: expected full, demo or quick" >&2; exit 2 ;;
esac
if [[ -n "${ONLY:-}" ]]; then
  KEPT=()
  for row in "${GRID[@]}"; do
    name=$(echo ${row%%|*})
    [[ " $ONLY " == *" $name "* ]] && KEPT+=("$row")
  done
  GRID=("${KEPT[@]}")
fi
OUT=${OUT:-runs/study-$PROFILE}
start=$SECONDS

echo "== assets: the embedded default model and the BIG-bench tasks (cached after the first run)"
workbench assets --suite "$SUITE"

completed() { [[ -f "$1/run.json" ]] && grep -q '"status": "completed"' "$1/run.json"; }

RUNS=()
NAMES=()
for row in "${GRID[@]}"; do
  IFS='|' read -r name recipe overrides <<< "$row"
  name=$(echo $name); recipe=$(echo $recipe)
  NAMES+=("$name")
  RUNS+=(--run "$OUT/$name")
  if completed "$OUT/$name"; then
    echo "== train: $name: completed before, kept"
    continue
  fi
  echo "== train: $name: recipes/smollm2/$recipe.yaml $overrides"
  # shellcheck disable=SC2086 # overrides are words
  workbench train "recipes/smollm2/$recipe.yaml" "name=$name" "${TRAIN_ARGS[@]}" ${overrides} --output-dir "$OUT/$name" --resume
done
echo "== trained in $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s"

echo "== eval: every run, its adapter scales and its checkpoints against the base ($SUITE)"
workbench eval --suite "$SUITE" "${RUNS[@]}" --out "$OUT/results.json"

echo "== compare: forgetting at matched learning, against training less (the baseline's front)"
workbench compare "$OUT/results.json" --forgetting "${FORGETTING[@]}" \
  --out "$OUT/compare.json" --markdown "$OUT/compare.md"

echo "== gate: evals/gates/release.yaml"
for name in "${NAMES[@]}"; do
  verdict=$(workbench gate "$OUT/results.json" --policy evals/gates/release.yaml --entry "$name" | tail -n 1) || true
  printf '%-20s %s\n' "$name" "${verdict#gate release: }"
done

workbench report "$OUT/results.json" "$OUT/compare.json" --out "$OUT/report" > /dev/null
echo "== done in $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s: $OUT/report/index.html"
