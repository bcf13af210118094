"""Parity: lm-evaluation-harness on our model == our scorer on the same task file."""

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.helpers import make_peft
from workbench.errors import UsageError
from workbench.evals.lmeval import run_lm_eval
from workbench.scoring.scorer import Scorer, multiple_choice
from workbench.evals.tasks import local_task
from workbench.modeling.tiny import tiny_tokenizer
from tests.helpers import REPO

EXAMPLE = REPO / "evals" / "tasks" / "capitals.yaml"  # the shipped example
WORDS = "red blue green stone river cloud apple seven quiet north tall bright old small".split()


@pytest.fixture(scope="module")
def lm_eval():
    return pytest.importorskip("lm_eval")


def make_docs(n: int, seed: int) -> list[dict]:
    """Questions with 2-5 choices of 1 to 6 words, so total and per-character scores disagree."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        k = rng.randint(2, 5)
        choices = list(dict.fromkeys(" ".join(rng.choices(WORDS, k=rng.randint(1, 6))) for _ in range(k)))
        docs.append({"id": i, "question": " ".join(rng.choices(WORDS, k=rng.randint(3, 12))),
                     "options": choices, "label": rng.randrange(len(choices))})
    return docs


def write(directory: Path, name: str, docs: list[dict], **config) -> Path:
    (directory / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    path = directory / f"{name}.yaml"
    base = {"task": name, "dataset_path": "json", "output_type": "multiple_choice", "test_split": "test",
            "dataset_kwargs": {"data_files": {"test": f"{name}.jsonl"}}}  # relative to the YAML
    path.write_text(yaml.safe_dump({**base, **config}, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lm_tasks")
    # templates, an int target, a description
    write(directory, "parity_templates", make_docs(30, seed=1), description="Answer briefly.\n\n",
          doc_to_text="Question: {{question}}?\nAnswer:", doc_to_choice="{{options}}", doc_to_target="{{label}}")
    # field names, the target as choice text, another delimiter
    docs = [{**d, "answer": d["options"][d["label"]]} for d in make_docs(10, seed=2)]
    write(directory, "parity_fields", docs, doc_to_text="question", doc_to_choice="options",
          doc_to_target="answer", target_delimiter=": ")
    return directory


@pytest.fixture(scope="module")
def model():
    return make_peft().eval()


def ours(model, tokenizer, path: Path, adapter: str) -> list[dict]:
    scorer = Scorer(model, tokenizer, batch_size=8)
    return [multiple_choice(scorer, item.context, item.choices, item.gold, adapter=adapter,
                            delimiter=item.delimiter) for item in local_task(path)]


def mean(values):  # lm-eval's `mean` aggregation, to compare aggregates exactly
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def runs(lm_eval, model, task_dir, tmp_path_factory):
    """lm-eval's results for tuned and base; run from another directory so relative paths matter."""
    tokenizer = tiny_tokenizer()
    elsewhere = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(elsewhere)
        # tasks by YAML path, and one by name found under include_path
        tasks = [str(task_dir / "parity_templates.yaml"), "parity_fields", str(EXAMPLE)]
        # torch and numpy drive training; python's `random` is advanced by datasets, not reseeded
        rng_before = (torch.random.get_rng_state(), np.random.get_state()[1].copy())
        results = {adapter: run_lm_eval(model, tokenizer, tasks, adapter=adapter, include_path=str(task_dir),
                                        batch_size=4, samples=True) for adapter in ("tuned", "base")}
        rng_after = (torch.random.get_rng_state(), np.random.get_state()[1].copy())
    results["rng_untouched"] = bool(torch.equal(rng_before[0], rng_after[0]) and (rng_before[1] == rng_after[1]).all())
    return results


@pytest.mark.parametrize("adapter", ["tuned", "base"])
@pytest.mark.parametrize("task", ["parity_templates", "parity_fields", "capitals"])
def test_acc_and_acc_norm_identical_to_lm_eval(runs, model, task_dir, task, adapter):
    theirs = runs[adapter][task]
    mine = ours(model, tiny_tokenizer(), EXAMPLE if task == "capitals" else task_dir / f"{task}.yaml", adapter)
    assert theirs["n_samples"] == len(mine) == len(theirs["samples"])
    for sample, result in zip(theirs["samples"], mine):
        assert sample["logprobs"] == pytest.approx(result["logprobs"], abs=1e-4)
        assert (sample["acc"], sample["acc_norm"]) == (result["acc"], result["acc_norm"])
    assert theirs["acc"] == mean([r["acc"] for r in mine])
    assert theirs["acc_norm"] == mean([r["acc_norm"] for r in mine])


def test_the_parity_task_tells_acc_from_acc_norm(runs):
    samples = runs["tuned"]["parity_templates"]["samples"]
    assert any(s["acc"] != s["acc_norm"] for s in samples)


def test_base_differs_from_tuned_and_the_adapter_comes_back(runs, model):
    tuned, base = runs["tuned"]["parity_templates"], runs["base"]["parity_templates"]
    gap = max(abs(a - b) for s, t in zip(tuned["samples"], base["samples"])
              for a, b in zip(s["logprobs"], t["logprobs"]))
    assert gap > 1e-2
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        after = model(input_ids=ids).logits
        with model.disable_adapter():
            off = model(input_ids=ids).logits
    assert (after - off).abs().max() > 1e-4  # the base run left the adapter enabled
    assert not model.training


def test_the_callers_random_generators_are_not_reseeded(runs):
    assert runs["rng_untouched"]


def test_compact_output_is_plain_json(runs):
    entry = dict(runs["tuned"]["parity_fields"])
    entry.pop("samples")
    assert set(entry) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n_samples"}
    json.dumps(runs)


def test_unknown_task_did_you_mean(lm_eval, model, task_dir):
    with pytest.raises(UsageError, match="'parity_feilds'.*did you mean 'parity_fields'"):
        run_lm_eval(model, tiny_tokenizer(), ["parity_feilds"], include_path=str(task_dir))


def test_without_the_extra_one_line_hint(monkeypatch, model):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(UsageError, match=r"pip install -e \.\[lmeval\]"):
        run_lm_eval(model, tiny_tokenizer(), ["anything"])
