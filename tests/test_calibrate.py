"""`workbench calibrate` on the tiny model: the bisection, the folded adapter, the exit codes.

The adapter is `make_run`'s (LoRA B set to noise, seed 3). Its general-text KL to the base grows
with the scale: about 0.084 per token at 0.375, 0.139 at 0.5 and 0.351 at 1, so a budget of 0.1
puts the answer strictly inside (0, 1), near 0.41.
"""

import json

import pytest
import torch
import yaml

from workbench.calibrate import bisect, write_outputs
from workbench.cli import main
from workbench.errors import WriteFailed
from workbench.evals.evaluate import run_eval
from workbench.gate import check, load_policy, passed
from tests.evals.test_evaluate import SUITE, make_run, values, write_task

KL_BUDGET = {"name": "kl_budget", "rules": [{"metric": "retention.general.kl", "max": 0.1}]}
TOLERANCE = 0.01


def one_line(capsys, prefix: str) -> str:
    """The one `error:` or `failed:` line on stderr, its last line (after any progress bars)."""
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith(("error:", "failed:"))]
    assert len(said) == 1 and said[0] == err.splitlines()[-1] and "Traceback" not in err, err
    assert said[0].startswith(prefix), said[0]
    return said[0]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WORKBENCH_CACHE", str(root / "cache"))
        write_task(root)
        (root / "suite.yaml").write_text(yaml.safe_dump(SUITE))
        (root / "kl.yaml").write_text(yaml.safe_dump(KL_BUDGET))
        make_run(root, "cal", seed=3)
        yield root


@pytest.fixture(scope="module")
def calibrated(workspace):
    """`workbench calibrate` run once through the CLI: (exit code, OUTDIR, calibration.json)."""
    out = workspace / "calibrated"
    code = main(["calibrate", "--run", str(workspace / "cal"), "--suite", str(workspace / "suite.yaml"),
                 "--policy", str(workspace / "kl.yaml"), "--out", str(out), "--tolerance", str(TOLERANCE)])
    return code, out, json.loads((out / "calibration.json").read_text())


@pytest.fixture(scope="module")
def swept(workspace, calibrated):
    """`workbench eval` of the source run with `scales: [s, s + tolerance]`."""
    s = calibrated[2]["chosen_scale"]
    (workspace / "swept.yaml").write_text(yaml.safe_dump({**SUITE, "scales": [s, s + TOLERANCE]}))
    return {e["scale"]: e for e in run_eval(workspace / "swept.yaml", runs=[workspace / "cal"])["entries"]}


def test_bisection_finds_the_largest_passing_scale_within_the_tolerance():
    calls = []

    def below(threshold):
        return lambda s: calls.append(s) or s <= threshold

    assert bisect(below(2.0), 0.01) == 1.0 and calls == [1.0]  # scale 1 passes: nothing else scored
    calls.clear()
    chosen = bisect(below(0.3), 0.01)
    assert 0.3 - 0.01 < chosen <= 0.3 and len(calls) == 8  # 1, then 7 halvings of [0, 1] to < 0.01
    assert min(s for s in calls if s > chosen) - chosen < 0.01
    calls.clear()
    assert bisect(below(0.0), 0.2) is None and calls == [1.0, 0.5, 0.25, 0.125]  # 0 is never scored


def test_the_calibrated_adapter_loads_in_peft_and_scores_as_the_scale_sweep_entry(workspace, calibrated, swept):
    """Folding s into B gives the adapter at scale s: its results.json entry, the sweep entry at
    s and the written adapter loaded with plain `PeftModel.from_pretrained` agree to 1e-5."""
    from peft import PeftModel

    from workbench.config.recipe import ModelSection
    from workbench.modeling.load import load_model
    from workbench.modeling.lora import adapter_scale

    code, out, record = calibrated
    s = record["chosen_scale"]
    assert code == 0 and 0.0 < s < 1.0
    assert {p.name for p in out.iterdir()} == {  # the adapter, its tokenizer, its manifest, the two records
        "adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "chat_template.jinja", "manifest.json", "results.json", "calibration.json"}
    written = json.loads((out / "results.json").read_text())
    assert [e["name"] for e in written["entries"]] == [f"cal@{s:g}"] and written["kind"] == "workbench.eval"
    reference = values(swept[s])
    assert values(written["entries"][0]) == pytest.approx(reference, abs=1e-5)
    # the base side was scored once over the whole search, as for one eval
    assert set(written["base"]["cache"]["misses"]) == {"general", "mc:mc", "target"}

    on_disk = values(run_eval(workspace / "suite.yaml", base="tiny-random-llama", adapters=[out])["entries"][0])
    assert {n.split(".")[0] for n in on_disk} == {"retention", "calibration"}  # no run.json: no target split
    # B * s and PEFT's scaling * s round differently in fp32: ~5e-8 relative, which on a
    # perplexity in the hundreds (this random model's) is more than 1e-5 absolute
    assert on_disk == pytest.approx({n: reference[n] for n in on_disk}, rel=1e-5, abs=1e-5)

    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    section = ModelSection(name="tiny-random-llama")
    folded = PeftModel.from_pretrained(load_model(section)[0], str(out)).eval()
    source = PeftModel.from_pretrained(load_model(section)[0], str(workspace / "cal" / "adapter")).eval()
    with torch.no_grad(), adapter_scale(source, s):
        assert torch.allclose(folded(ids).logits, source(ids).logits, atol=1e-5)


def test_the_chosen_scale_passes_and_one_tolerance_step_up_fails(workspace, calibrated, swept):
    _, _, record = calibrated
    s = record["chosen_scale"]
    policy = load_policy(workspace / "kl.yaml")
    verdict = {scale: passed(check({"entries": [swept[scale]]}, policy, ["*"])) for scale in (s, s + TOLERANCE)}
    assert verdict == {s: True, s + TOLERANCE: False}
    steps = record["steps"]
    assert steps[0]["scale"] == 1.0 and not steps[0]["passed"]
    assert steps[0]["failing"][0]["metric"] == "retention.general.kl"
    assert [st["scale"] for st in steps if st["passed"]][-1] == s
    assert record["fails_at"] - s < TOLERANCE and 0 < s < 1


def test_no_passing_scale_exits_1_naming_the_failing_rules(workspace, capsys):
    """KL <= 0.005 fails at every scale scored, and the perplexity ratio (below 1 for this random
    adapter at scale 1) fails at small scales: the line says so rather than blaming the budget."""
    (workspace / "never.yaml").write_text(yaml.safe_dump({"name": "never", "rules": [
        {"metric": "retention.general.kl", "max": 0.005}, {"metric": "retention.general.ppl.ratio", "max": 1.01}]}))
    out = workspace / "never"
    capsys.readouterr()
    code = main(["calibrate", "--run", str(workspace / "cal"), "--suite", str(workspace / "suite.yaml"),
                 "--policy", str(workspace / "never.yaml"), "--out", str(out), "--tolerance", "0.2"])
    line = one_line(capsys, "failed: no scale passes gate never")
    assert code == 1
    assert "smallest scale scored, 0.125: retention.general.kl = " in line and "not <= 0.005" in line
    assert "retention.general.ppl.ratio = " in line and "passes at scale 1 and fails below it" in line
    assert not out.exists()


def bad_suite(ws, tmp):
    return ["--suite", str(tmp / "nowhere.yaml"), "--policy", str(ws / "kl.yaml")], "nowhere.yaml: suite file not found"


def bad_policy(ws, tmp):
    return ["--suite", str(ws / "suite.yaml"), "--policy", str(tmp / "nope.yaml")], "nope.yaml: gate policy file not"


def tolerance(value):
    def case(ws, tmp):
        return (["--suite", str(ws / "suite.yaml"), "--policy", str(ws / "kl.yaml"), "--tolerance", value],
                f"--tolerance {value}: expected a number strictly between 0 and 1")
    case.__name__ = f"tolerance_{value}"
    return case


def unmeasured_metric(ws, tmp):
    """A rule on a metric the suite does not produce could never pass: refused after scale 1."""
    (ws / "no_overfitting.yaml").write_text(yaml.safe_dump({**SUITE, "overfitting": None}))  # beside mc.yaml
    (tmp / "mia.yaml").write_text(yaml.safe_dump({"rules": [{"metric": "overfitting.mia.loss.auc", "max": 0.6}]}))
    return (["--suite", str(ws / "no_overfitting.yaml"), "--policy", str(tmp / "mia.yaml")],
            "reads overfitting.mia.loss.auc, which the suite")


@pytest.mark.parametrize("bad", [bad_suite, bad_policy, tolerance("0"), tolerance("1"), tolerance("1.5"),
                                 tolerance("nan"), unmeasured_metric], ids=lambda f: f.__name__)
def test_bad_input_exits_2_with_one_line_and_no_outdir(workspace, tmp_path, capsys, bad):
    args, expected = bad(workspace, tmp_path)
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["calibrate", "--run", str(workspace / "cal"), "--out", str(out), *args])
    line = one_line(capsys, "error: ")
    assert code == 2 and expected in line, line
    assert not out.exists()


def test_an_existing_outdir_is_refused_and_left_alone(workspace, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(["calibrate", "--run", str(workspace / "cal"), "--suite", str(workspace / "suite.yaml"),
                 "--policy", str(workspace / "kl.yaml"), "--out", str(out)])
    assert code == 2 and "taken: already exists" in one_line(capsys, "error: ")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_write_that_fails_leaves_no_outdir_and_no_staging(workspace, tmp_path, monkeypatch):
    def broken(path, payload):
        if path.name == "calibration.json":
            raise OSError("disk full")
        path.write_text(json.dumps(payload))

    monkeypatch.setattr("workbench.calibrate.write_json", broken)
    out = tmp_path / "out"
    with pytest.raises(WriteFailed, match="disk full"):
        write_outputs(out, workspace / "cal" / "adapter", 0.5, {}, {})
    assert list(tmp_path.iterdir()) == []
