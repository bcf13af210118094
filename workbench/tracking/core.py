"""Weights & Biases tracking: run naming and grouping from the recipe, training and eval logging.

Tracking is on when a recipe has a `wandb:` section or a command gets `--wandb`. One W&B run per
training run: its config is the resolved recipe flattened to dotted keys (so grouping and
parallel-coordinates views work per regularizer knob), its history every Trainer log record
(each loss term, learning rate, gradient norm) plus tokens/s, and its artifacts the adapter and
the Fisher. `workbench eval` logs its results into the same W&B run (run.json keeps its id) as
summary metrics, tables and the report's plots.

Tracking never breaks a job: a missing `wandb` import, a failing `wandb.init`, a full disk or an
unreachable server each print one warning line, and the job goes on without W&B. No secret is
ever put into a config, a record or a log line: the API key is only looked up, never read out.
"""

from __future__ import annotations

import contextlib
import json
import math
import netrc
import os
import re
import struct
import sys
import tempfile
import time
import zlib
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from transformers import TrainerCallback

from workbench.distributed import is_main_process
from workbench.errors import UsageError
from workbench.formats.run_record import RunRecord, read_run
from workbench.io import fingerprint
from workbench.config.recipe import Recipe, WandbSection, read_yaml, resolved

# results.json sections -> W&B summary prefixes (`retention/*`, `overfit/*`, `learning/*`)
PREFIXES = {"retention": "retention", "overfitting": "overfit", "learning": "learning",
            "calibration": "calibration"}
CHANGES = ("delta", "ratio")  # how a tuned value is compared with its base, in metric names
DEFAULT_HOSTS = ["api.forge.coreweave.com", "api.wandb.ai"]  # wandb 0.31's default host, and the one before


# ---------------------------------------------------------------- names, groups, config


def family(recipe_path: str | Path) -> str:
    """The recipe family, the default W&B group: the folder a recipe sits in (`smollm2`), or for
    a recipe directly under `recipes/` the root of its `extends` chain (`tiny_all` -> `tiny`)."""
    path = Path(recipe_path).resolve()
    if path.parent.name != "recipes":
        return path.parent.name
    for _ in range(32):  # load_recipe has refused cycles already; the bound only guards misuse
        parent = read_yaml(path).get("extends")
        if not isinstance(parent, str):
            break
        path = (path.parent / parent).resolve()
    return path.stem


def enable(recipe: Recipe, recipe_path: str | Path | None = None, on: bool = False) -> Recipe:
    """The recipe with its `wandb` section filled in (group from the family), or unchanged when
    tracking is off (no section and no `--wandb`)."""
    if recipe.wandb is None and not on:
        return recipe
    section = recipe.wandb or WandbSection()
    if section.group is None:
        group = family(recipe_path) if recipe_path else recipe.name
        section = section.model_copy(update={"group": group})
    return recipe.model_copy(update={"wandb": section})


def recipe_hash(recipe: Recipe | dict) -> str:
    """A short hash of what the recipe trains: tracking settings and the output path left out,
    so the same knobs give the same hash wherever the run is written and however it is tracked."""
    data = resolved(recipe) if isinstance(recipe, Recipe) else dict(recipe)
    data.pop("wandb", None)
    data["train"] = {k: v for k, v in data.get("train", {}).items() if k != "output_dir"}
    return fingerprint(data)[:6]


def run_name(recipe: Recipe | dict) -> str:
    """`<recipe name>-<hash>`, unless the recipe names its W&B run."""
    data = resolved(recipe) if isinstance(recipe, Recipe) else recipe
    given = (data.get("wandb") or {}).get("name")
    return given or f"{data['name']}-{recipe_hash(data)}"


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; an empty or null section stays as one key."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def has_api_key() -> bool:
    """Whether W&B could log in: WANDB_API_KEY, or a netrc entry for the W&B host. The key itself
    is never read out of the entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    base = os.environ.get("WANDB_BASE_URL")
    hosts = [urlsplit(base).netloc] if base else DEFAULT_HOSTS
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        entries = netrc.netrc(str(path))
    except (OSError, netrc.NetrcParseError):
        return False
    return any((entries.authenticators(host) or (None, None, None))[2] for host in hosts)


def resolve_mode(section: WandbSection) -> str:
    """online, offline or disabled. WANDB_MODE wins (a machine-wide choice); `auto` and `online`
    without an API key become offline, since online would stop at a login prompt."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    mode = {"dryrun": "offline", "run": "online"}.get(env, env) or section.mode
    if mode not in ("online", "offline", "disabled"):
        mode = "auto"
    if mode in ("auto", "online"):
        return "online" if has_api_key() else "offline"
    return mode


def wandb_key(metric: str) -> str:
    """A results.json metric name as a W&B summary key: retention.general.ppl.ratio ->
    retention/general/ppl/ratio, overfitting.loss_gap -> overfit/loss_gap."""
    section, _, rest = metric.partition(".")
    return f"{PREFIXES.get(section, section)}/{rest.replace('.', '/')}" if rest else metric


def trainer_key(key: str) -> str:
    """A Trainer log key as a W&B key, as transformers' own WandbCallback names them:
    eval_loss -> eval/loss, everything else under train/."""
    return f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"


def _warn(what: str, exc: BaseException) -> None:
    from tqdm import tqdm

    reason = " ".join(str(exc).split())[:200] or type(exc).__name__
    # through tqdm, so that a progress bar on the terminal moves aside instead of sharing the line
    tqdm.write(f"warning: W&B {what} failed ({type(exc).__name__}: {reason}); continuing without tracking",
               file=sys.stderr)


def _artifact_name(text: str) -> str:
    """W&B artifact names allow letters, digits, dash, underscore and dot."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "artifact"


# ---------------------------------------------------------------- one W&B run, guarded


def _wait_for_a_fresh_offline_folder(directory: Path, run_id: str) -> None:
    """An offline rejoin goes to `offline-run-<start second>-<id>`; a rejoin within the same second
    as the run's last start (an eval right after a short training) would reuse that folder and
    overwrite its log, so wait for the clock to move on (at most about a second)."""
    def taken() -> bool:
        stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
        return (directory / "wandb" / f"offline-run-{stamp}-{run_id}").exists()

    deadline = time.monotonic() + 1.5
    while taken() and time.monotonic() < deadline:
        time.sleep(0.05)


class Tracker:
    """One W&B run behind calls that never raise: the first failure warns in one line and turns
    the tracker off for the rest of the job. An inactive tracker (`Tracker()`) does nothing."""

    def __init__(self, run=None, mode: str = "disabled", wandb=None):
        self.run = run
        self.mode = mode
        self.wandb = wandb  # the module, kept so that no later call has to import it again

    @property
    def active(self) -> bool:
        return self.run is not None

    @classmethod
    def start(cls, section: WandbSection, *, name: str, group: str | None, config: dict, job_type: str,
              directory: Path, run_id: str | None = None) -> "Tracker":
        """Start (or, with run_id, rejoin) a W&B run; an inactive tracker when off or failing."""
        mode = resolve_mode(section)
        if mode == "disabled":
            return cls()
        try:
            import wandb
        except Exception as exc:  # ImportError, or an install broken in some other way
            _warn("import", exc)
            return cls()
        directory = Path(os.environ.get("WANDB_DIR") or directory)  # WANDB_DIR wins, as in wandb itself
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if run_id and mode == "offline":
                _wait_for_a_fresh_offline_folder(directory, run_id)
            run = wandb.init(
                project=section.project, entity=section.entity, group=group, name=name,
                tags=list(section.tags), job_type=job_type, config=config, dir=str(directory),
                mode=mode, id=run_id, resume="allow" if run_id else None, reinit="create_new",
                # our stdout stays ours (no console capture), and wandb's banner is replaced by one line
                settings=wandb.Settings(console="off", silent=True))
        except Exception as exc:
            _warn("start", exc)
            return cls()
        why = " (no API key)" if mode == "offline" and not has_api_key() else ""
        print(f"wandb: {mode} run {name} ({run.id}) in group {group}{why}")
        return cls(run, mode, wandb)

    def _safely(self, what: str, fn, *args, **kwargs):
        """fn(*args, **kwargs), or None: when the tracker is off, or when fn fails (then warn once)."""
        if self.run is None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # a full disk, a dead service, a bad value: never the job's problem
            _warn(what, exc)
            self.run = None
            return None

    def info(self) -> dict:
        """What run.json records to find this run again: never a key or a token."""
        if self.run is None:
            return {}
        run = self.run
        return {"id": run.id, "name": run.name, "project": run.project, "entity": run.entity or None,
                "group": run.group, "mode": self.mode, "dir": self.sync_dir()}

    def sync_dir(self) -> str | None:
        """The run's local directory: what `wandb sync` uploads."""
        return self._safely("settings", lambda: str(self.run.settings.sync_dir))

    def log(self, metrics: dict) -> None:
        self._safely("log", lambda: self.run.log(metrics))

    def summary(self, metrics: dict) -> None:
        self._safely("summary", lambda: self.run.summary.update(metrics))

    def define_step(self, step_metric: str) -> None:
        """Plot every metric against `step_metric` (a key logged with it), not W&B's own counter:
        a resumed run logs from its checkpoint's step again without W&B dropping the records."""
        def define():
            self.run.define_metric(step_metric)
            self.run.define_metric("*", step_metric=step_metric, step_sync=True)
        self._safely("define_metric", define)

    def table(self, key: str, columns: list[str], rows: list[list]) -> None:
        self._safely("table", lambda: self.run.log({key: self.wandb.Table(columns=columns, data=rows,
                                                                          allow_mixed_types=True)}))

    def images(self, paths: dict[str, Path]) -> None:
        self._safely("images", lambda: self.run.log({k: self.wandb.Image(str(p)) for k, p in paths.items()}))

    def artifact(self, name: str, kind: str, path: Path, metadata: dict) -> None:
        """Log a file or a directory as an artifact; metadata carries its lineage (fingerprints)."""
        def log():
            artifact = self.wandb.Artifact(_artifact_name(name), type=kind, metadata=metadata)
            root = Path(path)
            # file by file rather than add_dir, which prints a progress line of its own
            for file in sorted(root.rglob("*")) if root.is_dir() else [root]:
                if file.is_file():
                    artifact.add_file(str(file), name=str(file.relative_to(root)) if root.is_dir() else file.name)
            self.run.log_artifact(artifact)
        self._safely(f"artifact {name}", log)

    def finish(self, exit_code: int = 0) -> None:
        """Close the run; offline, print the command that uploads it."""
        if self.run is None:
            return
        sync_dir = self.sync_dir() if self.mode == "offline" else None
        self._safely("finish", self.run.finish, exit_code=exit_code)
        self.run = None
        if sync_dir:
            print(f"wandb: offline run saved; upload it with: wandb sync {sync_dir}")

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind, exc, traceback) -> None:
        """Close the run as failed when the block raises, then let the exception go on."""
        if exc is not None:
            self.finish(exit_code=1)


# ---------------------------------------------------------------- training


class TrackingCallback(TrainerCallback):
    """Sends every key of every Trainer log record to W&B (loss terms, learning rate, gradient
    norm, eval loss), plus tokens/s over the steps since the previous record."""

    STEP = "train/global_step"

    def __init__(self, tracker: Tracker):
        self.tracker = tracker
        self._last: tuple[float, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.tracker.define_step(self.STEP)
        self._last = (time.perf_counter(), state.num_input_tokens_seen)

    def on_evaluate(self, args, state, control, **kwargs):
        # restart the clock: time spent evaluating is not training throughput
        self._last = (time.perf_counter(), state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.tracker.active or not logs:
            return
        metrics = {trainer_key(k): v for k, v in logs.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if "loss" in logs and self._last is not None:
            now, tokens = time.perf_counter(), state.num_input_tokens_seen
            if now > self._last[0] and tokens > self._last[1]:
                metrics["train/tokens_per_second"] = (tokens - self._last[1]) / (now - self._last[0])
            self._last = (now, tokens)
        self.tracker.log({**metrics, self.STEP: state.global_step})


def start_training(recipe: Recipe, trainer, output_dir: Path, record: RunRecord, resume: bool = False) -> Tracker:
    """Hook tracking into a built trainer, on every rank; start the W&B run on rank 0 only.

    Token counting is switched on (on every rank, since the Trainer gathers the counts) whenever
    the recipe has tracking on; the W&B id goes into `record` (run.json), and a resumed run
    rejoins the W&B run its run.json names.
    """
    if recipe.wandb is None:
        return Tracker()
    trainer.args.include_num_input_tokens_seen = "non_padding"
    if not is_main_process():
        return Tracker()
    previous = _previous_id(output_dir) if resume else None
    config = {**flatten(resolved(recipe)), "run.recipe_hash": recipe_hash(recipe),
              "run.model_fingerprint": record.model_fingerprint,
              "run.train_fingerprint": record.data.get("train_fingerprint"),
              "run.world_size": record.world_size}
    tracker = Tracker.start(recipe.wandb, name=run_name(recipe), group=recipe.wandb.group or recipe.name,
                            config=config, job_type="train", directory=output_dir, run_id=previous)
    trainer.add_callback(TrackingCallback(tracker))
    if tracker.active:
        record.wandb = tracker.info()
    return tracker


def _previous_id(output_dir: Path) -> str | None:
    try:
        return (read_run(output_dir).wandb or {}).get("id")
    except UsageError:
        return None


def lineage(record: dict) -> dict:
    """Where an output came from: the base weights, the training data, the recipe."""
    return {"model_fingerprint": record.get("model_fingerprint"),
            "train_fingerprint": (record.get("data") or {}).get("train_fingerprint"),
            "recipe_hash": recipe_hash(record["recipe"]) if "recipe" in record else None,
            "base_model": (record.get("recipe") or {}).get("model", {}).get("name")}


def finish_training(tracker: Tracker, output_dir: Path, record: RunRecord, exit_code: int = 0) -> None:
    """Log the adapter and the Fisher as artifacts, with their lineage, and close the run."""
    if not tracker.active:
        return
    if exit_code:
        tracker.finish(exit_code=exit_code)
        return
    record = record.model_dump()
    name = run_name(record["recipe"])
    meta = lineage(record)
    tracker.artifact(f"{name}-adapter", "model", output_dir / record.get("adapter", "adapter"), meta)
    fisher = record.get("fisher") or {}
    if fisher.get("path") and Path(fisher["path"]).is_file():
        tracker.artifact(f"{name}-fisher", "fisher", Path(fisher["path"]),
                         {**meta, **{k: v for k, v in fisher.items() if k != "path"}})
    tracker.finish()


class TrainingObserver:
    """W&B tracking of a training run, as `training.run.train` expects its observer."""

    def start(self, recipe: Recipe, trainer, output_dir: Path, record: RunRecord, resume: bool) -> Tracker:
        return start_training(recipe, trainer, output_dir, record, resume)

    def finish(self, tracker: Tracker, output_dir: Path, record: RunRecord, exit_code: int = 0) -> None:
        finish_training(tracker, output_dir, record, exit_code)


# ---------------------------------------------------------------- evals


def metric_rows(entry: dict) -> dict[str, list[list]]:
    """An entry's metrics as table rows per section, one row per task and metric:
    [entry, scale, task, metric, base, tuned, change, ci_low, ci_high], the CI being the change's
    (or, for a metric with no base side, the value's)."""
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for name, record in entry["metrics"].items():
        stem, _, side = name.rpartition(".")
        if side in ("base", "tuned", *CHANGES):
            groups[stem][side] = record
        else:
            groups[name]["value"] = record
    tables: dict[str, list[list]] = defaultdict(list)
    for stem, sides in groups.items():
        section, task, metric = _split(stem)
        change = next((sides[k] for k in (*CHANGES, "value") if k in sides), {})
        ci = change.get("ci") or [None, None]
        tables[PREFIXES.get(section, section)].append(
            [entry["name"], entry.get("scale", 1.0), task, metric, _value(sides.get("base")),
             _value(sides.get("tuned")), _value(change), ci[0], ci[1]])
    return tables


TABLE_COLUMNS = ["entry", "scale", "task", "metric", "base", "tuned", "change", "ci_low", "ci_high"]


def _split(stem: str) -> tuple[str, str, str]:
    """retention.mc.arith.acc -> (retention, arith, acc); retention.general.kl -> (retention,
    general, kl); learning.val_loss -> (learning, target, val_loss)."""
    section, *rest = stem.split(".")
    if section == "retention" and rest[:1] == ["mc"]:
        rest = rest[1:]
    if section in ("retention", "calibration") and len(rest) > 1:
        return section, rest[0], ".".join(rest[1:])
    return section, "target", ".".join(rest)


def _value(record: dict | None) -> float | None:
    value = (record or {}).get("value")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def log_eval(results: dict, results_path: Path, force: bool | None = None) -> None:
    """Log eval results to W&B: each run's entries into the W&B run its run.json names; with
    `force` (`--wandb`) also untracked runs and bare adapters, into new eval runs. force=False
    logs nothing."""
    if force is False:
        return
    try:
        _log_eval(results, results_path, force)
    except Exception as exc:  # a run.json of another version, an odd entry: the results are on disk
        _warn("eval logging", exc)


def _log_eval(results: dict, results_path: Path, force: bool | None) -> None:
    by_run: dict[str | None, list[dict]] = defaultdict(list)
    for entry in results["entries"]:
        by_run[entry.get("run")].append(entry)
    plots: dict[str, Path] | None = None
    with tempfile.TemporaryDirectory() as scratch:
        for run_dir, entries in by_run.items():
            record = _read_run(run_dir)
            if not force and not (record.get("wandb") or {}).get("id"):
                continue
            tracker = _eval_tracker(results, results_path, run_dir, record)
            if not tracker.active:
                continue
            if plots is None:
                plots = _report_plots(results_path, Path(scratch))
            _log_entries(tracker, entries, results, results_path, record, plots)


def _read_run(run_dir: str | None) -> dict:
    if not run_dir:
        return {}
    try:
        return read_run(run_dir).model_dump()
    except UsageError:
        return {}


def _eval_tracker(results: dict, results_path: Path, run_dir: str | None, record: dict) -> Tracker:
    """Rejoin the training run's W&B run when run.json has its id, else start an eval run."""
    recipe = record.get("recipe")
    known = record.get("wandb") or {}
    section = WandbSection.model_validate((recipe or {}).get("wandb") or {})
    if recipe:
        name, group = known.get("name") or run_name(recipe), known.get("group") or section.group or recipe["name"]
        config = flatten(recipe)
    else:
        suite = results["suite"]["name"]
        name, group, config = f"eval-{suite}-{fingerprint(results['entries'][0]['adapter'])[:6]}", "eval", {}
    config["eval.suite"] = results["suite"]["name"]
    directory = Path(run_dir) if run_dir else Path(results_path).parent
    return Tracker.start(section, name=name, group=group, config=config, job_type="eval",
                         directory=directory, run_id=known.get("id"))


def _log_entries(tracker: Tracker, entries: list[dict], results: dict, results_path: Path,
                 record: dict, plots: dict[str, Path]) -> None:
    """Summary metrics (the scale-1 entry), one table per section, the plots, results.json."""
    for entry in entries:
        if float(entry.get("scale", 1.0)) == 1.0:
            tracker.summary({wandb_key(name): _value(m) for name, m in entry["metrics"].items()
                             if _value(m) is not None})
    tables: dict[str, list[list]] = defaultdict(list)
    for entry in entries:
        for section, rows in metric_rows(entry).items():
            tables[section] += rows
    for section, rows in tables.items():
        tracker.table(f"eval/{section}", TABLE_COLUMNS, rows)
    if plots:
        tracker.images(plots)
    meta = {**lineage(record), "suite_fingerprint": results["suite"].get("fingerprint"),
            "base_fingerprint": results["base"].get("fingerprint")}
    name = tracker.info().get("name") or "eval"
    tracker.artifact(f"{name}-results", "eval-results", Path(results_path), meta)
    tracker.finish()


def _report_plots(results_path: Path, scratch: Path) -> dict[str, Path]:
    """The report's plots (built into a scratch directory), keyed plots/<name>."""
    from workbench.report.html import build_report

    try:
        build_report([results_path], scratch / "report")
    except Exception as exc:  # a plot that cannot be drawn must not cost the rest of the logging
        _warn("report plots", exc)
        return {}
    return {f"plots/{p.stem}": p for p in sorted((scratch / "report" / "plots").glob("*.png"))}


# ---------------------------------------------------------------- reading an offline run back


LOG_HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version
RECORD_HEADER = struct.Struct("<IHB")  # crc32, length, chunk type (full, first, middle, last)
BLOCK = 32768


def read_records(path: str | Path) -> Iterator[Any]:
    """Decode a run's `.wandb` file into `wandb_internal_pb2.Record` messages.

    wandb 0.31 has no Python reader of its own (its `DataStore` was removed), so this reads the
    LevelDB-style log it writes: 32 KiB blocks of chunks, each a crc32/length/type header, the
    chunks of one record joined; a chunk whose checksum fails ends the read (a torn tail).
    """
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, _ = LOG_HEADER.unpack_from(data)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path}: not a W&B run file")
    pos, parts = LOG_HEADER.size, b""
    while pos + RECORD_HEADER.size <= len(data):
        if BLOCK - pos % BLOCK < RECORD_HEADER.size:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = RECORD_HEADER.unpack_from(data, pos)
        chunk = data[pos + RECORD_HEADER.size: pos + RECORD_HEADER.size + length]
        if kind == 0 or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            break
        pos += RECORD_HEADER.size + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record
