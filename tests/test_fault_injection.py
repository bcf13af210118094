"""Fault injection at every read and write.

Reads: every file format the workbench reads, each damaged four ways (cut to half its length,
zeroed, a byte flipped in the middle, removed). Each must give one line naming the file (exit 2),
or fall back to a good alternative saying so in one line (an older checkpoint, a cache entry
computed again). Writes: every write of training, eval, fisher, report, compare, calibrate,
average and the sweep run with ENOSPC
injected at the write itself (Python's open, torch.save, safetensors' save_file). Each must give
one line naming the file and the cause (exit 1), leave run.json saying `failed`, and damage
nothing that was good before. The outcome tables are printed (pytest -s) and asserted whole.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from tests.helpers import REPO, make_peft, repo
from workbench.cli import main
from workbench.config.recipe import ModelSection, load_recipe
from workbench.errors import RunFailed, UsageError, WriteFailed
from workbench.formats.integrity import check_sealed, write_manifest
from workbench.formats.results import load_results
from workbench.formats.run_record import read_run, run_state
from workbench.io import read_json
from workbench.modeling.lora import lora_factors
from workbench.modeling.tiny import tiny_model, tiny_tokenizer
from workbench.training.faults import check_checkpoint, latest_checkpoint

TRAIN = ["train.max_steps=4", "train.save_steps=2", "train.eval_steps=null", "data.val_fraction=0.25",
         "data.max_examples=32", "regularizers.lora_dropout=0"]
FAULTS = ("truncate", "zero", "flip", "remove")


def damage(path: Path, fault: str) -> None:
    data = bytearray(path.read_bytes())
    if fault == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif fault == "zero":
        path.write_bytes(bytes(len(data)))
    elif fault == "flip":
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.unlink()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with checkpoints 2 and 4 and its adapter, trained once per module."""
    from workbench.training.run import train

    out = tmp_path_factory.mktemp("trained") / "run"
    train(load_recipe(repo("recipes/tiny.yaml"), TRAIN), out)
    return out


# ------------------------------------------------------------------------- reads

def _peft_and_fisher():
    model = make_peft()
    return model, {k: torch.ones(n) for f in lora_factors(model)
                   for k, n in ((f"{f.key}.g", f.B.shape[0]), (f"{f.key}.a", f.A.shape[1]))}


def _setup(fmt: str, root: Path, trained: Path) -> tuple[Path, callable]:
    """(the file to damage, a reader that goes through the workbench's own path for it)."""
    from workbench.data.sources import read_records
    from workbench.evals.evaluate import _check_adapter_dir
    from workbench.evals.suite import load_suite
    from workbench.gate import load_policy
    from workbench.modeling.load import _load_pretrained
    from workbench.scoring.base_cache import BaseCache
    from workbench.sweep.spec import load_spec
    from workbench.training.fisher import load_fisher, save_fisher

    copy = lambda src, name: Path(shutil.copy(REPO / src, root / name))  # noqa: E731
    if fmt == "recipe":
        return copy("recipes/tiny.yaml", "tiny.yaml"), lambda p: load_recipe(p)
    if fmt == "suite":
        return copy("evals/tiny.yaml", "suite.yaml"), lambda p: load_suite(p)
    if fmt == "policy":
        return copy("evals/gates/release.yaml", "policy.yaml"), lambda p: load_policy(p)
    if fmt == "sweep spec":
        return copy("recipes/sweeps/tiny_random_lr.yml", "sweep.yml"), lambda p: load_spec(p)
    if fmt == "data":
        path = root / "data.jsonl"
        path.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) + "\n" for i in range(40)))
        return path, lambda p: read_records(str(p))
    if fmt == "results":
        path = Path(shutil.copy(_results_file(), root / "results.json"))
        return path, lambda p: load_results(p)
    if fmt == "run record":
        run = Path(shutil.copytree(trained, root / "run", ignore=shutil.ignore_patterns("checkpoints")))
        return run / "run.json", lambda p: read_run(p.parent)
    if fmt in ("adapter", "adapter config"):
        run = Path(shutil.copytree(trained / "adapter", root / "adapter"))
        name = "adapter_model.safetensors" if fmt == "adapter" else "adapter_config.json"
        return run / name, lambda p: _check_adapter_dir(p.parent)
    if fmt.startswith("checkpoint"):
        run = Path(shutil.copytree(trained, root / "run"))
        name = fmt.split(" ", 1)[1]
        return run / "checkpoints/checkpoint-4" / name, lambda p: _resume_point(p.parents[2])
    if fmt == "model":
        model_dir = root / "model"
        tiny_model(len(tiny_tokenizer())).save_pretrained(model_dir)
        write_manifest(model_dir)
        return model_dir / "model.safetensors", lambda p: _load_pretrained(ModelSection(name=str(p.parent)), p.parent)
    if fmt == "fisher":
        model, fisher = _peft_and_fisher()
        path = save_fisher(root / "fisher.safetensors", fisher, {"estimator": "kfac_diag"})
        return path, lambda p: load_fisher(p, model)
    if fmt == "base cache":
        cache = BaseCache("fp", root=root / "cache")
        cache.get("general", (), lambda: {"x": torch.arange(1000.0)})
        return cache.path("general"), lambda p: _cache_read(cache)
    raise KeyError(fmt)


def _resume_point(run: Path) -> str:
    skipped = []
    found = latest_checkpoint(run, skipped)
    if found is None:
        raise UsageError(f"{run}: no checkpoint loads")
    for path, why in skipped:
        print(f"resume: skipping {path.name}: {why}")
    return found.name


def _cache_read(cache) -> None:
    computed = []
    tensors = cache.get("general", (), lambda: computed.append(1) or {"x": torch.arange(1000.0)})
    assert torch.equal(tensors["x"], torch.arange(1000.0))  # the fallback gives the right values


_RESULTS = {}


def _results_file() -> Path:
    from tests.test_gate import results

    if "path" not in _RESULTS:
        path = Path(__import__("tempfile").mkdtemp()) / "results.json"
        path.write_text(json.dumps(results(), indent=2))
        _RESULTS["path"] = path
    return _RESULTS["path"]


FORMATS = ("recipe", "suite", "policy", "sweep spec", "data", "results", "run record", "adapter", "adapter config",
           "checkpoint optimizer.pt", "checkpoint adapter_model.safetensors", "checkpoint trainer_state.json",
           "checkpoint manifest.json", "model", "fisher", "base cache")
# Where a good alternative exists the reader takes it and says so; everything else is an error line.
# The exceptions load with nothing to say: the first half of evals/tiny.yaml is itself a valid
# suite (nothing can tell a hand-written file cut short from a shorter one); a checkpoint whose
# manifest is gone is checked file by file by format instead; a removed cache entry is a miss.
FALLBACK = {f for f in FORMATS if f.startswith("checkpoint") or f == "base cache"}
STILL_VALID = {("suite", "truncate"), ("checkpoint manifest.json", "remove"), ("base cache", "remove")}


def read_outcome(fmt: str, fault: str, root: Path, trained: Path, capsys) -> tuple[str, str]:
    path, reader = _setup(fmt, root, trained)
    capsys.readouterr()
    damage(path, fault)
    try:
        reader(path)
    except UsageError as exc:
        line = str(exc)
        assert "\n" not in line and (str(path) in line or str(path.parent) in line), line
        return "error", line
    printed = capsys.readouterr().out.strip()
    if printed:
        assert len(printed.splitlines()) == 1 and path.name in printed, printed
        return "fallback", printed
    return "loads", ""


def test_every_format_under_every_fault_gives_one_line_or_a_fallback(tmp_path, trained, capsys):
    outcomes, lines = {}, {}
    for fmt in FORMATS:
        for fault in FAULTS:
            root = tmp_path / f"{fmt}-{fault}".replace(" ", "_")
            root.mkdir()
            outcomes[fmt, fault], lines[fmt, fault] = read_outcome(fmt, fault, root, trained, capsys)
    expected = {(f, x): "loads" if (f, x) in STILL_VALID else "fallback" if f in FALLBACK else "error"
                for f in FORMATS for x in FAULTS}
    with capsys.disabled():
        print(f"\n{len(outcomes)} (format x fault) cases:")
        for key, outcome in outcomes.items():
            print(f"  {key[0]:40s} {key[1]:9s} {outcome:8s} {lines[key][:150]}")
    assert outcomes == expected


# ------------------------------------------------------------------------ writes

@contextlib.contextmanager
def enospc(fragment: str, after: int = 0):
    """Every write whose path contains `fragment` fails with ENOSPC, past the first `after` of
    them: Python's open for writing, torch.save and safetensors' save_file (each module's own
    reference to it, since `from safetensors.torch import save_file` copies the name)."""
    hits = {"n": 0}

    def hit(path) -> bool:
        if fragment in str(path):
            hits["n"] += 1
            return hits["n"] > after
        return False

    def fail(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    real_open, real_save, real_st, real_usage = builtins.open, torch.save, safetensors.torch.save_file, shutil.disk_usage

    def fake_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and hit(file):
            fail(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, Path)) and hit(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                               "file data/0: file write failed")
        return real_save(obj, f, *args, **kwargs)

    def fake_usage(path):  # torch's writer does not say why it failed: the workbench looks at the disk
        usage = real_usage(path)
        return usage._replace(free=0) if hits["n"] > after else usage

    def fake_st(tensors, filename, *args, **kwargs):
        if hit(filename):
            fail(filename)
        return real_st(tensors, filename, *args, **kwargs)

    patched = [(m, name) for m in list(sys.modules.values()) for name in ("save_file", "safe_save_file")
               if getattr(m, name, None) is real_st]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builtins, "open", fake_open)
        mp.setattr(io, "open", fake_open)
        mp.setattr(torch, "save", fake_save)
        mp.setattr(shutil, "disk_usage", fake_usage)
        for module, name in patched:
            mp.setattr(module, name, fake_st)
        yield hits


def _train(out: Path, overrides=()):
    from workbench.training.run import train

    return train(load_recipe(repo("recipes/tiny.yaml"), [*TRAIN, *overrides]), out)


TRAINING_WRITES = {  # what fails -> (fragment, writes of it to let through, newest good checkpoint after)
    "run.json at start": ("run.json", 0, None),
    "run.json at the end": ("run.json", 1, "checkpoint-4"),
    "checkpoint optimizer.pt": ("checkpoint-4/optimizer.pt", 0, "checkpoint-2"),
    "checkpoint adapter": ("checkpoint-4/adapter_model.safetensors", 0, "checkpoint-2"),
    "checkpoint trainer_state.json": ("checkpoint-4/trainer_state.json", 0, "checkpoint-2"),
    "checkpoint manifest": ("checkpoint-4/.manifest.json", 0, "checkpoint-2"),
    "final adapter": ("/adapter/adapter_model.safetensors", 0, "checkpoint-4"),
}


@pytest.mark.parametrize("write", TRAINING_WRITES)
def test_a_failed_write_in_training_names_the_file_and_the_last_good_checkpoint(tmp_path, write):
    fragment, after, newest = TRAINING_WRITES[write]
    out = tmp_path / "run"
    with enospc(fragment, after) as hits, pytest.raises(WriteFailed) as exc:
        _train(out)
    line = str(exc.value)
    assert hits["n"] > after and "\n" not in line and "no space left on device" in line, line
    assert fragment.split("/")[0].lstrip(".") in line, line  # names the file (or its checkpoint)
    if newest is None:
        assert "no complete checkpoint" in line and not (out / "run.json").exists()
        return
    assert f"newest complete checkpoint: {out / 'checkpoints' / newest}" in line and "--resume" in line, line
    record = read_run(out)
    if fragment == "run.json":  # the record itself cannot be written: it reads stale, never running
        assert record.status == "running" and run_state(record, out) == "stale"
    else:
        assert record.status == "failed" and "no space left on device" in record.reason
    assert latest_checkpoint(out).name == newest and check_checkpoint(out / "checkpoints" / newest) is None
    print(f"\n{write}: failed: {line}")


def test_eval_report_and_fisher_writes_fail_cleanly_and_keep_the_previous_file(tmp_path, trained, capsys):
    """eval: the base cache entry (a fallback: the job goes on uncached) and results.json; the
    fisher file; the report's HTML. Each previous good file stays byte for byte."""
    from workbench.training.fisher import save_fisher

    suite = tmp_path / "suite.yaml"
    suite.write_text("name: t\nbatch_size: 16\nmax_length: 64\ngeneral:\n  source: builtin:pydoc_heldout\n"
                     "  num_chunks: 4\n  chunk_length: 32\n  top_k: 8\n")
    out = tmp_path / "results.json"
    env = pytest.MonkeyPatch.context()
    with env as mp:
        mp.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
        assert main(["eval", "--suite", str(suite), "--run", str(trained), "--out", str(out)]) == 0
        good = out.read_bytes()
        capsys.readouterr()
        shutil.rmtree(tmp_path / "cache")
        with enospc("evals/base/"), enospc("results.json"):
            code = main(["eval", "--suite", str(suite), "--run", str(trained), "--out", str(out)])
    captured = capsys.readouterr()
    cache_lines = [line for line in captured.out.splitlines() if line.startswith("cache: could not write")]
    error = captured.err.strip().splitlines()[-1]
    assert code == 1 and cache_lines and "no space left on device" in cache_lines[0]
    assert error.startswith(f"failed: could not write {out} (no space left on device)"), error
    assert out.read_bytes() == good

    _, fisher = _peft_and_fisher()
    path = save_fisher(tmp_path / "fisher.safetensors", fisher, {"estimator": "kfac_diag"})
    good = path.read_bytes()
    with enospc("fisher.safetensors"), pytest.raises(WriteFailed, match="no space left on device"):
        save_fisher(path, {k: v * 2 for k, v in fisher.items()}, {"estimator": "kfac_diag"})
    assert path.read_bytes() == good and check_sealed(path) is None

    report = tmp_path / "report"
    assert main(["report", str(out), "--out", str(report)]) == 0
    good = (report / "index.html").read_bytes()
    capsys.readouterr()
    with enospc("index.html"):
        code = main(["report", str(out), "--out", str(report)])
    error = capsys.readouterr().err.strip()
    assert code == 1 and error == (f"failed: could not write {report / 'index.html'} (no space left on device); "
                                   "the previous file, if any, is unchanged"), error
    assert (report / "index.html").read_bytes() == good


def test_compare_calibrate_average_and_sweep_writes_fail_cleanly(tmp_path, trained, capsys):
    """The other writers: compare.json, the calibrated adapter (staged, then renamed), the averaged
    run (the same) and the sweep's W&B config. Each: exit 1 with one line naming the file and the
    cause; the previous file unchanged, or no output and no staging left. The two new adapters are
    sealed with a manifest, like training's."""
    from tests.compare.build import results as compare_results, sweep, write
    from workbench.calibrate import write_outputs
    from workbench.formats.integrity import check_folder
    from workbench.sweep.spec import load_spec
    from workbench.sweep.wandb_sweep import write_wandb_sweep

    def last_error() -> str:
        return capsys.readouterr().err.strip().splitlines()[-1]

    outcomes = {}
    data = write(tmp_path, compare_results(*sweep("baseline"), *sweep("kl", shift=-0.1)))
    out = tmp_path / "compare.json"
    assert main(["compare", str(data), "--out", str(out)]) == 0
    good = out.read_bytes()
    capsys.readouterr()
    with enospc("compare.json"):
        code = main(["compare", str(data), "--out", str(out)])
    outcomes["compare.json"] = last_error()
    assert code == 1 and outcomes["compare.json"].startswith(f"failed: could not write {out} (no space left on device)")
    assert out.read_bytes() == good

    calibrated = tmp_path / "calibrated"
    with enospc("adapter_model.safetensors"), pytest.raises(WriteFailed) as exc:
        write_outputs(calibrated, trained / "adapter", 0.5, {}, {})
    outcomes["calibrated adapter"] = str(exc.value)
    assert "no space left on device" in str(exc.value) and str(calibrated) in str(exc.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.json", "results.json"]  # nothing staged left
    write_outputs(calibrated, trained / "adapter", 0.5, {}, {})
    assert (calibrated / "manifest.json").is_file() and check_folder(calibrated) is None

    averaged = tmp_path / "averaged"
    args = ["average", str(trained), "--steps", "final", "2", "--out", str(averaged)]
    with enospc("adapter_model.safetensors"):
        code = main(args)
    outcomes["averaged run"] = last_error()
    assert code == 1 and outcomes["averaged run"].startswith(f"failed: could not write {averaged} (no space left")
    assert not averaged.exists() and not any(p.name.startswith(".averaged") for p in tmp_path.iterdir())
    assert main(args) == 0 and check_folder(averaged / "adapter") is None
    assert (averaged / "adapter" / "manifest.json").is_file()

    spec_path = Path(repo("recipes/sweeps/tiny_kl_x_ewc.yml"))
    config = tmp_path / "sweep" / "wandb_sweep.yaml"
    write_wandb_sweep(load_spec(spec_path), spec_path, config)
    good = config.read_bytes()
    with enospc("wandb_sweep.yaml"):
        code = main(["sweep", str(spec_path), "--output-dir", str(tmp_path / "sweep"), "--dry-run"])
    outcomes["sweep W&B config"] = last_error()
    assert code == 1 and outcomes["sweep W&B config"].startswith(f"failed: could not write {config} (no space left")
    assert config.read_bytes() == good
    print("\n" + "\n".join(f"{write}: {line}" for write, line in outcomes.items()))


def test_a_run_killed_outright_reads_stale_and_a_failed_one_gives_its_reason(tmp_path, trained):
    """SIGKILL leaves `running` in run.json (nothing can write); with no process holding the
    lock, readers say stale. Negative control: while the lock is held it is `running`."""
    import subprocess

    from workbench.formats.run_record import describe_state, run_lock, run_state

    run = Path(shutil.copytree(trained, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints")))
    record = read_json(run / "run.json")
    record["status"] = "running"
    (run / "run.json").write_text(json.dumps(record))
    with run_lock(run):
        assert run_state(read_run(run), run) == "running"
    child = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom workbench.formats.run_record import run_lock\n"
                              f"with run_lock({str(run)!r}):\n    print('held', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert child.stdout.readline().strip() == "held"
    assert run_state(read_run(run), run) == "running"
    child.kill()
    child.wait()
    assert run_state(read_run(run), run) == "stale"
    assert describe_state(read_run(run), run).startswith("stale: run.json says running")
    with pytest.raises(UsageError, match=r"no final adapter to evaluate: the run is stale: run.json says running"):
        from workbench.evals.evaluate import resolve_specs
        resolve_specs([run], [])
