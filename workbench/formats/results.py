"""`results.json`: what `workbench eval` writes and what `gate` and `report` read.

Schema version 1:

    {
      "schema_version": 1,
      "kind": "workbench.eval",
      "created": "2026-11-22T10:00:00+00:00",
      "suite": {"name": "tiny", "path": "evals/tiny.yaml", "fingerprint": "..."},
      "base": {"model": "tiny-random-llama", "fingerprint": "...", "cache": "hit" | "miss"},
      "versions": {"workbench": "...", "torch": "...", ...},
      "entries": [
        {
          "name": "tiny",                  # unique label; scale-sweep entries are "tiny@0.5"
          "adapter": "runs/tiny/adapter",
          "run": "runs/tiny" | null,       # the run directory when known
          "scale": 1.0,                    # LoRA scale: 0 is the base, 1 the tuned adapter
          "changes_model": true,           # false when the adapter's delta is exactly zero
          "metrics": {"retention.general.ppl.ratio": {"value": 1.03, "ci": [1.01, 1.05]}, ...},
          "curves": {"overfitting.mia.loss.roc": {"fpr": [...], "tpr": [...]},
                     "calibration.all.reliability": {"base": [bin, ...], "tuned": [bin, ...]}}
        }
      ],
      "lm_eval": {...}                     # optional: lm-evaluation-harness results, per entry
    }

A metric is {"value": float} plus "ci": [low, high] (paired bootstrap 95%) where it has one.
Names are dotted paths; `<task>` is a multiple-choice task name, and "all" pools every task's
items. Accuracies and rates are fractions in [0, 1] (a 1-point drop is a delta of -0.01).

    learning.val_loss.{base,tuned,delta}           mean token NLL on held-out target examples
    learning.val_ppl.{base,tuned}
    learning.exact_match.{base,tuned,delta}        greedy generation == reference completion
    retention.general.ppl.{base,tuned,ratio}       token perplexity on general text
    retention.general.kl                           mean per-token KL(base || tuned)
    retention.general.top1_agreement               argmax(base) == argmax(tuned), per token
    retention.mc.<task>.{acc,acc_norm}.{base,tuned,delta}
    overfitting.train_loss.tuned                   the same NLL on training examples
    overfitting.loss_gap                           val_loss.tuned - train_loss.tuned
    overfitting.extraction.{train,heldout,gap}     prefix -> exact suffix rate
    overfitting.mia.<score>.{auc,tpr_at_1pct_fpr}  score in loss, min_k, loss_ratio
    calibration.<task>.{ece,ece_adaptive,brier}.{base,tuned,delta}

Curves (for plots): "overfitting.mia.<score>.roc" {"fpr", "tpr"}; "calibration.<task>.reliability"
{"base", "tuned"}, each a list of bins {lo, hi, count, accuracy, confidence} (equal width).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from workbench.errors import UsageError

SCHEMA_VERSION = 1
KIND = "workbench.eval"


def metric(value: float, ci: tuple[float, float] | None = None) -> dict:
    """One metric record; NaN and inf are kept out of JSON as None."""
    def clean(x: float) -> float | None:
        x = float(x)
        return x if math.isfinite(x) else None

    record: dict[str, Any] = {"value": clean(value)}
    if ci is not None:
        record["ci"] = [clean(ci[0]), clean(ci[1])]
    return record


def load_results(path: str | Path) -> dict:
    """Read and check a results file; any problem is a one-line UsageError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: results file not found")
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not a results JSON file ({exc})") from None
    if not isinstance(results, dict) or results.get("kind") != KIND:
        raise UsageError(f"{path}: not a workbench results file (no \"kind\": \"{KIND}\")")
    if results.get("schema_version") != SCHEMA_VERSION:
        raise UsageError(f"{path}: schema_version {results.get('schema_version')!r}, "
                         f"this workbench reads {SCHEMA_VERSION}")
    entries = results.get("entries")
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"{path}: no entries")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) \
                or not isinstance(entry.get("metrics"), dict):
            raise UsageError(f"{path}: entries[{i}] needs a name and a metrics mapping")
    return results
