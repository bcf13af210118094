"""One function a command: parse nothing, import what the command needs when it runs (so that
`--help`, `gate` and the other commands that read only JSON or YAML never import torch), call
the library, print where the outputs went, return the exit code."""

from __future__ import annotations

from pathlib import Path

from workbench.distributed import is_main_process
from workbench.errors import UsageError

RECIPES_DIR = Path("recipes")


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
        names += load_suite(path)[0].bigbench_tasks()
    models = [named_model(name).name for name in args.model or [DEFAULT]]  # every name checked first
    for name in dict.fromkeys(models):
        print(f"model: {ensure_named_model(name)}")
    if names:
        for name, path in fetch_bigbench(sorted(set(names))).items():
            print(f"bigbench {name}: {path}")
    return 0


def cmd_recipes(args) -> int:
    import yaml

    from workbench.config.recipe import Recipe, load_recipe, resolved

    if args.keys is not None:
        if args.recipe:
            raise UsageError("recipes --keys lists the schema's keys, not a recipe's: give no recipe")
        from workbench.config.keys import keys, text_table, under

        print(text_table(under(keys(Recipe), args.keys, "recipes --keys")), end="")
        return 0
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
        on += ["base_replay"] if recipe.regularizers.base_replay else []
        on += ["self_distill"] if recipe.data.self_distill else []
        on += [f"loss {recipe.train.loss}"] if recipe.train.loss != "nll" else []
        on += [f"example_weights {recipe.train.example_weights}"] if recipe.train.example_weights != "none" else []
        lora = recipe.lora
        on += [f"method {lora.method}"] if lora.method != "lora" else []
        on += [f"init {lora.init}"] if lora.init != "default" else []
        on += [f"targets {lora.target_modules}"] if lora.target_modules != "all-linear" else []
        on += [f"layers {lora.layers}"] if lora.layers else []
        print(f"{str(path):40s} {recipe.model.name:24s} {', '.join(on) or '-'}")
    return 0
