"""The argument parser of `workbench`: one subparser a command, each calling its `commands` function."""

from __future__ import annotations

import argparse
from pathlib import Path

from workbench.cli.commands import (
    cmd_assets, cmd_average, cmd_calibrate, cmd_compare, cmd_eval, cmd_fisher, cmd_gate, cmd_recipes,
    cmd_reduce_intruders, cmd_report, cmd_summarize, cmd_sweep, cmd_train,
)

DESCRIPTION = ("`workbench train | fisher | eval | gate | calibrate | compare | summarize | report | sweep | "
               "recipes`: exit 0 on success, 1 when a job fails, 2 on bad input.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description=DESCRIPTION)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune under a recipe")
    train.add_argument("recipe", help="recipe YAML")
    train.add_argument("overrides", nargs="*", metavar="key.path=value", help="recipe overrides")
    train.add_argument("--output-dir", type=Path, help="default: train.output_dir or runs/<name>")
    train.add_argument("--resume", action="store_true",
                       help="continue from the newest complete checkpoint in the output directory")
    train.add_argument("--wandb", action="store_true",
                       help="track in Weights & Biases (offline when there is no API key)")
    train.set_defaults(func=cmd_train)

    fisher = sub.add_parser("fisher", help="estimate the EWC Fisher of the LoRA-targeted base weights")
    fisher.add_argument("recipe")
    fisher.add_argument("overrides", nargs="*", metavar="key.path=value")
    fisher.add_argument("--out", help="default: <output_dir>/fisher.safetensors")
    fisher.set_defaults(func=cmd_fisher)

    avg = sub.add_parser("average", help="average a run's adapter with its checkpoints, in weight space")
    avg.add_argument("run", type=Path, help="a run directory written by `workbench train`")
    avg.add_argument("--steps", nargs="+", required=True, metavar="STEP",
                     help="'final' (the run's adapter) and checkpoint steps, e.g. --steps final 20")
    avg.add_argument("--weights", nargs="+", type=float, metavar="W", help="default: equal; must sum to 1")
    avg.add_argument("--out", type=Path, required=True, help="the new run directory")
    avg.set_defaults(func=cmd_average)

    red = sub.add_parser("reduce-intruders", help="damp a run's adapter's intruder dimensions (PEFT's "
                         "reduce_intruder_dimension), written as a new run")
    red.add_argument("run", type=Path, help="a run directory written by `workbench train`")
    red.add_argument("--out", type=Path, required=True, help="the new run directory")
    red.add_argument("--top-k", type=int, default=10, help="singular vectors of each tuned layer examined "
                     "(default: %(default)s)")
    red.add_argument("--epsilon", type=float, default=0.5, help="an intruder's best |cosine| with the base's "
                     "singular vectors is under this (default: %(default)s)")
    red.add_argument("--lambda", dest="mitigation", type=float, default=0.75,
                     help="the share of each intruder direction kept (default: %(default)s)")
    red.set_defaults(func=cmd_reduce_intruders)

    ev = sub.add_parser("eval", help="retention, learning and overfitting evals: tuned vs base")
    ev.add_argument("--suite", required=True, type=Path, help="eval suite YAML (see evals/)")
    ev.add_argument("--run", action="append", type=Path, default=[], metavar="RUN_DIR",
                    help="a training run directory; repeat to evaluate several on one loaded base")
    ev.add_argument("--base", help="base model (hub id, local dir or embedded name) for --adapter")
    ev.add_argument("--adapter", action="append", type=Path, default=[], metavar="DIR",
                    help="a PEFT adapter directory; repeatable")
    ev.add_argument("--out", required=True, type=Path, help="results JSON to write")
    ev.add_argument("--train-data", metavar="FILE", help="the training data of the --adapter adapters (JSONL, CSV, "
                    "Parquet, builtin:NAME, bigbench:TASK), for the overfitting metrics: membership inference and "
                    "extraction compare it with held-out examples")
    ev.add_argument("--no-cache", action="store_true", help="score the base again instead of reading the cache")
    ev.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=None,
                    help="log results to W&B (default: into each run's W&B run when run.json names one)")
    ev.set_defaults(func=cmd_eval)

    gate = sub.add_parser("gate", help="release decision over a results file: exit 0 pass, 1 fail")
    gate.add_argument("results", type=Path)
    gate.add_argument("--policy", required=True, type=Path, help="gate policy YAML (see evals/gates/)")
    gate.add_argument("--entry", action="append", metavar="NAME", help="entries to check (default: the policy's)")
    gate.add_argument("--json", metavar="FILE", help="write the decision as JSON for CI ('-': to standard "
                      "output, in place of the table)")
    gate.add_argument("--junit", metavar="FILE", help="write the checks as JUnit XML, one test case per check")
    gate.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=None,
                      help="log the decision to W&B (default: for each run whose run.json names a W&B run)")
    gate.set_defaults(func=cmd_gate)

    cal = sub.add_parser("calibrate", help="the largest adapter scale that passes a gate policy, written as a "
                         "new adapter: exit 0 found, 1 no scale passes")
    source = cal.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, metavar="RUN_DIR", help="a training run directory")
    source.add_argument("--adapter", type=Path, metavar="DIR", help="a PEFT adapter directory (with --base)")
    cal.add_argument("--base", help="base model (hub id, local dir or embedded name) for --adapter")
    cal.add_argument("--suite", required=True, type=Path, help="eval suite YAML (see evals/)")
    cal.add_argument("--policy", required=True, type=Path, help="gate policy YAML (see evals/gates/)")
    cal.add_argument("--out", required=True, type=Path, metavar="OUTDIR",
                     help="new directory: the scaled adapter, results.json and calibration.json")
    cal.add_argument("--tolerance", type=float, default=0.01, metavar="T",
                     help="stop bisecting when the bracket on the scale is narrower than T, in (0, 1) "
                          "(default: %(default)s)")
    cal.set_defaults(func=cmd_calibrate)

    compare = sub.add_parser("compare", help="which recipe forgets less for the same learning: each family's "
                             "front against the reference's (training less), with 95%% CIs")
    compare.add_argument("results", nargs="+", type=Path, metavar="RESULTS.json",
                         help="results files, merged; put them before the options")
    compare.add_argument("--learning", metavar="METRIC",
                         help="the learning axis (default: learning.val_loss.tuned); its direction from the catalogue")
    compare.add_argument("--forgetting", action="extend", nargs="+", metavar="METRIC",
                         help="forgetting metrics (default: retention.general.ppl.ratio, retention.general.kl "
                              "and every retention.mc.<task>.acc.delta in all entries)")
    compare.add_argument("--reference", metavar="FAMILY",
                         help="the family that trains less (default: 'baseline')")
    compare.add_argument("--levels", type=int, default=5, metavar="N",
                         help="matched learning levels over each overlap (default: %(default)s)")
    compare.add_argument("--out", type=Path, metavar="compare.json", help="write the versioned JSON")
    compare.add_argument("--markdown", type=Path, metavar="compare.md", help="write a Markdown table")
    compare.set_defaults(func=cmd_compare)

    summarize = sub.add_parser("summarize", help="one table across cells (model x task): each family's verdict "
                               "and difference per cell's compare.json, and a random-effects pool")
    summarize.add_argument("cells", nargs="+", metavar="CELL=compare.json",
                           help="a cell's name and its compare.json, such as smollm2/unscramble=runs/su/compare.json")
    summarize.add_argument("--metric", action="append", metavar="METRIC",
                           help="a forgetting metric, one table each; repeatable (default: the first all cells share)")
    summarize.add_argument("--out", type=Path, metavar="summary.json", help="write the versioned JSON")
    summarize.add_argument("--markdown", type=Path, metavar="summary.md", help="write the Markdown tables")
    summarize.set_defaults(func=cmd_summarize)

    report = sub.add_parser("report", help="HTML and Markdown report with plots")
    report.add_argument("inputs", nargs="+", type=Path, metavar="RUN_OR_RESULTS")
    report.add_argument("--out", required=True, type=Path, help="output directory")
    report.add_argument("--policy", type=Path, help="a gate policy: the page opens with the release decision")
    report.set_defaults(func=cmd_report)

    assets = sub.add_parser("assets", help="fetch and cache named models (the embedded default unless --model) "
                            "and BIG-bench tasks")
    assets.add_argument("--model", action="append", metavar="NAME",
                        help="a named model to fetch, verify and convert: smollm2-135m-instruct (the default), "
                        "gemma3-270m (Gemma terms, docs/model.md); repeatable")
    assets.add_argument("--bigbench", nargs="*", default=[], metavar="TASK", help="BIG-bench task names")
    assets.add_argument("--suite", action="append", type=Path, default=[],
                        help="also every BIG-bench task this suite names; repeatable")
    assets.set_defaults(func=cmd_assets)

    sweep = sub.add_parser("sweep", help="grid or random search over recipe overrides, ranked in a leaderboard")
    sweep.add_argument("spec", type=Path, help="sweep spec YAML (see recipes/sweeps/)")
    sweep.add_argument("--parallel", type=int, default=1, metavar="N", help="local processes at once")
    sweep.add_argument("--wandb", action="store_true", help="track every run in W&B, in one group")
    sweep.add_argument("--output-dir", type=Path, help="default: the spec's output_dir or runs/sweeps/<name>")
    sweep.add_argument("--dry-run", action="store_true",
                       help="validate, list the runs and write the wandb sweep YAML; train nothing")
    sweep.set_defaults(func=cmd_sweep)

    recipes = sub.add_parser("recipes", help="list the recipes, show one fully resolved, or list every key")
    recipes.add_argument("recipe", nargs="?")
    recipes.add_argument("overrides", nargs="*", metavar="key.path=value")
    recipes.add_argument("--keys", nargs="?", const="", metavar="SECTION",
                         help="every recipe key (or those under SECTION, e.g. train or regularizers.kl_to_base) "
                         "with its type, default and description")
    recipes.set_defaults(func=cmd_recipes)
    return parser
