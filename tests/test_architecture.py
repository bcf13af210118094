"""The layers as a test: imports point down, training and evals never import each other, and the
commands that only read JSON and YAML load no torch (checked in a fresh interpreter)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGE = REPO / "workbench"

# Lower numbers sit lower. A module may import from its own layer or any layer below it.
LAYERS = {
    "workbench": 0, "workbench.errors": 0, "workbench.io": 0,  # the root holds only __version__
    "workbench.config": 1, "workbench.formats": 1, "workbench.assets": 1,
    "workbench.distributed": 2,
    "workbench.modeling": 3,
    "workbench.scoring": 4,
    "workbench.data": 5,
    "workbench.training": 6, "workbench.evals": 6,
    "workbench.gate": 7, "workbench.calibrate": 7, "workbench.compare": 7, "workbench.report": 7,
    "workbench.tracking": 7, "workbench.sweep": 7,
    "workbench.cli": 8, "workbench.__main__": 8,
}
SIDE_BY_SIDE = {"workbench.training", "workbench.evals"}  # the same layer, never each other
NO_TORCH = ("workbench.errors", "workbench.io", "workbench.config", "workbench.formats", "workbench.assets",
            "workbench.data.sources", "workbench.data.bigbench", "workbench.distributed",
            "workbench.gate", "workbench.compare", "workbench.tracking.names", "workbench.sweep.spec")
MAX_LINES = 400
# A results entry's own keys, and the file's list of entries: only formats/ reads them off raw JSON.
RESULTS_KEYS = ("entries", "metrics", "scale", "light", "changes_model", "delta_norm", "curves", "items")
JSON_READS = ("read_json", "load", "loads")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """The LAYERS key a module belongs to: its longest dotted prefix listed there."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return ".".join(parts[:n])
    raise KeyError(f"{module} is in no layer: add its package to LAYERS and to the README's Architecture")


def workbench_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every workbench import in the file, function-level ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; write `from workbench.x import y`")
        names = ([node.module] if isinstance(node, ast.ImportFrom) else
                 [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
        found += [(node.lineno, name) for name in names if name and name.split(".")[0] == "workbench"]
    return found


def violations(imports: dict[str, list[tuple[int, str]]]) -> list[str]:
    out = []
    for module, targets in imports.items():
        own = layer_of(module)
        for line, target in targets:
            theirs = layer_of(target)
            if LAYERS[theirs] > LAYERS[own]:
                out.append(f"{module}:{line} imports {target}, a higher layer")
            elif own != theirs and {own, theirs} == SIDE_BY_SIDE:
                out.append(f"{module}:{line} imports {target}: training and evals share only lower layers")
    return out


def package_imports() -> dict[str, list[tuple[int, str]]]:
    return {module_name(p): workbench_imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_imports_point_down_and_training_and_evals_never_meet():
    assert violations(package_imports()) == []


def test_the_rule_catches_an_upward_import_and_a_training_evals_one():
    """Negative control: the checker flags what it guards against."""
    bad = {"workbench.training.fisher": [(3, "workbench.evals.runner")],
           "workbench.scoring.scorer": [(4, "workbench.training.trainer")],
           "workbench.formats.results": [(5, "workbench.modeling.load")]}
    assert len(violations(bad)) == 3
    assert violations({"workbench.evals.runner": [(1, "workbench.scoring.masks")]}) == []


def raw_results_reads(source: str) -> list[str]:
    """Where code reads results.json around `formats.results`: a subscript or `.get` of an entry's
    own keys (`entry["metrics"]`, `e.get("scale")`), or JSON reading of a results file."""
    found = []
    for node in ast.walk(ast.parse(source)):
        key = (node.slice if isinstance(node, ast.Subscript) else
               node.args[0] if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
               and node.func.attr == "get" and node.args else None)
        if isinstance(key, ast.Constant) and key.value in RESULTS_KEYS:
            found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in JSON_READS and "results" in ast.unparse(node):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_results_json_is_read_only_through_formats():
    """Every reader asks the typed Entry (`entry.value(name)`, `entry.scale`), none the raw dict."""
    found = {module_name(p): hits for p in sorted(PACKAGE.rglob("*.py"))
             if not module_name(p).startswith("workbench.formats") and (hits := raw_results_reads(p.read_text()))}
    assert found == {}


def test_the_results_scan_catches_reads_of_the_raw_entry():
    """Negative control: lines as gate, compare, the leaderboard and the report read results.json
    before formats/results.py owned the entry are each caught; typed reads and other files'
    keys (a run's history, a gate decision) are not."""
    old = (
        'record = entry["metrics"][metric]\n'
        'chosen = [e for e in entries if e.get("scale", 1.0) == 1.0 and e.get("light") is not True]\n'
        'entries = read_json(path, "results JSON file")["entries"]\n'
        'items = entry.data.get("items")\n'
        'data = json.loads(results_path.read_text())\n')
    assert sorted(int(hit.split(":")[0]) for hit in raw_results_reads(old)) == [1, 2, 2, 3, 3, 4, 5]
    typed = ('x = entry.value("retention.general.kl", "ci_low")\nchosen = [e for e in entries if e.scale == 1.0]\n'
             'steps = [h["step"] for h in history]\npassed = outcome["checks"]\nrun = read_json(path, "run record")\n')
    assert raw_results_reads(typed) == []


def test_every_module_fits_on_a_few_screens():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def _fresh(code: str, cwd: Path = REPO) -> dict:
    """Run `code` in a new interpreter; it prints a JSON object as its last line."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_bottom_layers_import_without_torch():
    loaded = _fresh(f"import importlib, json, pkgutil, sys\n"
                    f"names = {list(NO_TORCH)!r}\n"
                    "for name in names:\n"
                    "    module = importlib.import_module(name)\n"
                    "    for sub in pkgutil.walk_packages(getattr(module, '__path__', []), name + '.'):\n"
                    "        importlib.import_module(sub.name)\n"
                    "print(json.dumps({'torch': 'torch' in sys.modules}))")
    assert loaded == {"torch": False}


def _command(argv: list[str]) -> str:
    return ("import json, sys\n"
            "from workbench.cli import main\n"
            "try:\n"
            f"    code = main({argv!r})\n"
            "except SystemExit as exc:\n"
            "    code = exc.code\n"
            "print(json.dumps({'code': code, 'torch': 'torch' in sys.modules}))")


@pytest.mark.parametrize("argv", [["--help"], ["gate", "--help"], ["calibrate", "--help"], ["recipes"],
                                  ["recipes", "recipes/tiny.yaml"], ["recipes", "--keys"]],
                         ids=" ".join)
def test_reading_commands_load_no_torch(argv):
    assert _fresh(_command(argv)) == {"code": 0, "torch": False}


def test_gate_on_a_results_file_loads_no_torch(tmp_path):
    from tests.test_gate import results

    path = tmp_path / "results.json"
    path.write_text(json.dumps(results()))
    outcome = _fresh(_command(["gate", str(path), "--policy", str(REPO / "evals/gates/release.yaml")]))
    assert outcome["torch"] is False and outcome["code"] in (0, 1)  # passed or failed, but it ran


def test_the_torch_check_sees_torch_when_it_is_loaded():
    """Negative control: a command that trains does import torch, and the check says so."""
    assert _fresh("import json, sys\nimport workbench.training.trainer\n"
                  "print(json.dumps({'torch': 'torch' in sys.modules}))") == {"torch": True}
