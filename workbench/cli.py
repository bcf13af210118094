"""`workbench train | fisher | eval | gate | calibrate | compare | summarize | report | sweep | recipes`: exit 0 on success, 1 when a job fails, 2 on bad input."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from workbench.distributed import is_main_process, shutdown_distributed
from workbench.errors import Interrupted, RunFailed, UsageError, first_line

RECIPES_DIR = Path("recipes")


def _quiet_libraries() -> None:
    """Keep the terminal for our own progress: no telemetry, no per-import advisories. Set
    through the environment, which the libraries read when (and only if) a command imports them."""
    import logging
    import warnings

    # bitsandbytes looks for an optional CPU kernel through the `kernels` package, which logs a
    # warning about the hub's trust check on every import when the hub is offline
    for name in ("kernels", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices inside libraries


def _close_progress_bars() -> None:
    """Close every progress bar still open (innermost first), so that a line printed after an
    error starts a line of its own: a bar left open by an exception ends without a newline, and
    the error would be glued to it in a log file (`...it/s][Afailed: ...`)."""
    std = sys.modules.get("tqdm.std")  # only when a command drew bars: tqdm is never imported for this
    if std is None:
        return
    for bar in sorted(list(std.tqdm._instances), key=lambda b: -(getattr(b, "pos", 0) or 0)):
        bar.leave = True  # end the bar's line with a newline rather than erase it in place
        bar.close()


def cmd_train(args) -> int:
    from workbench.config.recipe import load_recipe
    from workbench.tracking.names import enable

    recipe = enable(load_recipe(args.recipe, args.overrides), args.recipe, on=args.wandb)  # before torch loads
    from workbench.training.run import train
    from workbench.tracking.training import TrainingObserver

    output_dir = Path(args.output_dir or recipe.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"{output_dir}: output directory is an existing file")
    run_dir = train(recipe, output_dir, resume=args.resume, observer=TrainingObserver())
    if is_main_process():
        print(f"run: {run_dir / 'run.json'}\nadapter: {run_dir / 'adapter'}")
    return 0


def cmd_average(args) -> int:
    from workbench.training.average import average_run

    out = average_run(args.run, args.steps, args.out, args.weights)
    print(f"run: {out / 'run.json'}\nadapter: {out / 'adapter'}")
    return 0


def cmd_reduce_intruders(args) -> int:
    from workbench.training.intruders import reduce_run

    out, counts = reduce_run(args.run, args.out, args.top_k, args.epsilon, args.mitigation)
    print(f"reduce-intruders: {counts['layers_with_intruders']} of {counts['layers']} layers had intruders "
          f"({counts['intruder_dimensions']} dimensions damped)\nrun: {out / 'run.json'}\nadapter: {out / 'adapter'}")
    return 0


def cmd_fisher(args) -> int:
    from workbench.training.fisher import save_fisher
    from workbench.config.recipe import load_recipe
    from workbench.training.run import compute_fisher, prepare

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.regularizers.ewc is None or not recipe.regularizers.ewc.reference:
        raise UsageError(f"{args.recipe}: set regularizers.ewc.reference (data to estimate the Fisher on)")
    out = Path(args.out or recipe.output_dir / "fisher.safetensors")
    if out.is_dir():
        raise UsageError(f"{out}: --out is a directory; give a file name such as {out / 'fisher.safetensors'}")
    tokenizer, _, model, base_fingerprint = prepare(recipe)
    fisher, metadata = compute_fisher(recipe, model, tokenizer, base_fingerprint)
    if not is_main_process():
        return 0
    save_fisher(out, fisher, metadata)
    print(f"fisher: {out} ({len(fisher)} tensors, estimator {metadata['estimator']}, "
          f"{metadata['num_examples']} examples)")
    return 0


def cmd_eval(args) -> int:
    from workbench.evals.evaluate import run_eval

    if not args.run and not args.adapter:
        raise UsageError("eval: give --run RUN_DIR, or --base MODEL --adapter DIR")
    if args.out.exists() and args.out.is_dir():
        raise UsageError(f"{args.out}: --out is a directory; give a file name such as {args.out / 'results.json'}")
    if args.train_data and not args.adapter:
        raise UsageError("eval --train-data: for --adapter (a run's training data is in its run.json)")
    results = run_eval(args.suite, runs=args.run, adapters=args.adapter, base=args.base, out=args.out,
                       use_cache=not args.no_cache, train_data=args.train_data)
    if not is_main_process():
        return 0
    from workbench.report.tables import summary_table
    from workbench.tracking.evals import log_eval

    print(summary_table(results))
    print(f"results: {args.out}")
    log_eval(results, args.out, force=args.wandb)  # after the results are safe on disk
    return 0


def cmd_sweep(args) -> int:
    from workbench.sweep.runner import run_sweep

    return run_sweep(args.spec, parallel=args.parallel, wandb=args.wandb, output_dir=args.output_dir,
                     dry_run=args.dry_run)


def cmd_gate(args) -> int:
    from workbench.gate import run_gate

    return run_gate(args.results, args.policy, args.entry, json_out=args.json, junit_out=args.junit,
                    wandb=args.wandb)


def cmd_calibrate(args) -> int:
    from workbench.calibrate import run_calibrate

    return run_calibrate(args.suite, args.policy, args.out, run=args.run, adapter=args.adapter, base=args.base,
                         tolerance=args.tolerance)


def cmd_compare(args) -> int:
    from workbench.compare.command import run_compare

    return run_compare(args.results, args.learning, args.forgetting, args.reference, args.levels,
                       args.out, args.markdown)


def cmd_summarize(args) -> int:
    from workbench.compare.summarize import run_summarize

    return run_summarize(args.cells, args.metric, args.out, args.markdown)


def cmd_report(args) -> int:
    from workbench.report.build import build_report

    index = build_report(args.inputs, args.out, policy=args.policy)
    print(f"report: {index}")
    return 0


def cmd_assets(args) -> int:
    from workbench.evals.suite import load_suite
    from workbench.assets.bigbench import fetch_bigbench
    from workbench.assets.models import DEFAULT, named_model
    from workbench.modeling.load import ensure_named_model

    names = list(args.bigbench)
    for path in args.suite:
        suite, _ = load_suite(path)
        names += [task.bigbench for task in suite.multiple_choice if task.bigbench]
        names += [s.removeprefix("bigbench:").split(":")[0] for s in (suite.target.heldout, suite.target.train)
                  if suite.target and s and s.startswith("bigbench:")]
    models = [named_model(name).name for name in args.model or [DEFAULT]]  # every name checked first
    for name in dict.fromkeys(models):
        print(f"model: {ensure_named_model(name)}")
    if names:
        for name, path in fetch_bigbench(sorted(set(names))).items():
            print(f"bigbench {name}: {path}")
    return 0


def cmd_recipes(args) -> int:
    import yaml

    from workbench.config.recipe import load_recipe, resolved

    if args.recipe:
        recipe = load_recipe(args.recipe, args.overrides)
        print(yaml.safe_dump(resolved(recipe), sort_keys=False), end="")
        return 0
    for path in sorted(RECIPES_DIR.rglob("*.yaml")):
        if "accelerate" in path.parts or "sweeps" in path.parts:  # launch configs and sweep specs
            continue
        recipe = load_recipe(path)
        on = [name for name in ("weight_decay", "lora_dropout", "label_smoothing", "neftune_alpha")
              if getattr(recipe.regularizers, name)] + list(recipe.penalties())
        on += ["replay"] if recipe.data.replay else []
        on += [f"loss {recipe.train.loss}"] if recipe.train.loss != "nll" else []
        lora = recipe.lora
        on += [f"init {lora.init}"] if lora.init != "default" else []
        on += [f"targets {lora.target_modules}"] if lora.target_modules != "all-linear" else []
        on += [f"layers {lora.layers}"] if lora.layers else []
        print(f"{str(path):40s} {recipe.model.name:24s} {', '.join(on) or '-'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description=__doc__)
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

    recipes = sub.add_parser("recipes", help="list the recipes, or show one fully resolved")
    recipes.add_argument("recipe", nargs="?")
    recipes.add_argument("overrides", nargs="*", metavar="key.path=value")
    recipes.set_defaults(func=cmd_recipes)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may follow options (`train R --output-dir D a.b=1`), which argparse won't intermix
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    _quiet_libraries()
    try:
        code = args.func(args)
        shutdown_distributed()
        return code
    except BaseException as exc:
        _close_progress_bars()
        code = _stopped_short(exc, args.debug)
        if code is None:
            raise
        return code


def _stopped_short(exc: BaseException, debug: bool) -> int | None:
    """Print the one line a command ends with when it stops short; its exit code (None: not ours
    to handle, such as SystemExit)."""
    if debug and not isinstance(exc, (Interrupted, KeyboardInterrupt)):
        traceback.print_exception(exc)
    if isinstance(exc, UsageError):
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if isinstance(exc, RunFailed):
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    if isinstance(exc, Interrupted):
        print(f"interrupted: {exc}", file=sys.stderr)
        return 128 + exc.signum
    if isinstance(exc, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    if isinstance(exc, Exception):  # a fault the workbench does not know: one line, the traceback on request
        print(f"failed: unexpected {type(exc).__name__}: {first_line(exc)} (run again with --debug for the "
              "traceback)", file=sys.stderr)
        return 1
    return None


if __name__ == "__main__":
    sys.exit(main())
