"""One small tracked study shared by the tracking tests: a baseline and a KL run of
recipes/tiny.yaml trained with W&B offline, evaluated in one `workbench eval`, gated and reported.
About 35 s on 2 CPU cores, so it is built once for the package."""

import contextlib
import io
import json

import pytest
import yaml

from tests.helpers import REPO, repo
from workbench.cli import main

FAST = ["train.max_steps=3", "data.max_examples=24", "train.eval_steps=null", "data.max_val_examples=8"]
PENALTIES = ["regularizers.kl_to_base.weight=0.5", "regularizers.delta_l2.weight=0.1"]
SECRET = "wbtestsecret-0123456789abcdef0123456789abcdef"
SUITE = {"name": "tiny-fast", "batch_size": 8, "max_length": 64, "bootstrap": 50,
         "general": {"source": "builtin:pydoc_heldout", "num_chunks": 4, "chunk_length": 32, "top_k": 64},
         "target": {"num_examples": 8, "max_new_tokens": 4}, "overfitting": {"num_examples": 8}}
# passes whatever three steps on a random model do: the test is about where the decision goes
LENIENT = {"name": "lenient", "rules": [{"metric": "retention.general.ppl.ratio", "max": 100.0},
                                        {"metric": "learning.val_loss.delta", "max": 100.0}]}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc: no API key
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="package")
def study(tmp_path_factory):
    """Two fine-tunes tracked offline with an API key in the environment (offline because
    WANDB_MODE says so): `baseline` (no penalty) and `kl` (kl_to_base 0.5 and delta_l2 0.1),
    evaluated together, gated with LENIENT (logged to W&B because run.json names W&B runs) and
    reported; everything printed is captured."""
    root = tmp_path_factory.mktemp("study")
    (root / "suite.yaml").write_text(yaml.safe_dump(SUITE))
    (root / "lenient.yaml").write_text(yaml.safe_dump(LENIENT))
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.chdir(REPO)
        for key, value in {"WORKBENCH_CACHE": root / "cache", "WANDB_DIR": root / "wandb", "HOME": root / "home",
                           "WANDB_MODE": "offline", "WANDB_API_KEY": SECRET}.items():
            mp.setenv(key, str(value))
        dirs = {"baseline": root / "baseline", "kl": root / "kl"}
        assert main(["train", repo("recipes/tiny.yaml"), *FAST, "--output-dir", str(dirs["baseline"]), "--wandb"]) == 0
        assert main(["train", repo("recipes/tiny.yaml"), *FAST, *PENALTIES, "--output-dir", str(dirs["kl"]),
                     "--wandb"]) == 0
        results = root / "results.json"
        assert main(["eval", "--suite", str(root / "suite.yaml"), "--run", str(dirs["baseline"]),
                     "--run", str(dirs["kl"]), "--out", str(results)]) == 0
        gate_json = root / "gate.json"
        gate_code = main(["gate", str(results), "--policy", str(root / "lenient.yaml"), "--json", str(gate_json)])
        from workbench.report.build import build_report
        build_report([results, *dirs.values()], root / "report")
    return {"root": root, "dirs": dirs, "results": json.loads(results.read_text()),
            "runs": {k: json.loads((d / "run.json").read_text()) for k, d in dirs.items()},
            "gate_code": gate_code, "gate": json.loads(gate_json.read_text()),
            "stdout": out.getvalue(), "stderr": err.getvalue()}
