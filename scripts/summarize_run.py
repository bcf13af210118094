"""Print what a run logged: the first and last value of every loss term, and the final metrics."""

import json
import sys

run = json.load(open(sys.argv[1]))
steps = [h for h in run["history"] if "task_loss" in h]
terms = [k for k in steps[0] if k in ("loss", "task_loss") or k in run["penalties"] or
         k.removesuffix("_weighted") in run["penalties"]]
print(f"\n{run['recipe']['name']}: {run['global_step']} steps on {run['recipe']['model']['name']}")
print(f"{'term':24s} {'first step':>12s} {'last step':>12s}")
for key in terms:
    print(f"{key:24s} {steps[0][key]:12.4f} {steps[-1][key]:12.4f}")
for key in ("eval_loss", "train_runtime"):
    if key in run["final"]:
        print(f"{key:24s} {run['final'][key]:25.4f}")
