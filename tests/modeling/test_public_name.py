"""Adapters travel: adapter_config.json names the base by its public name, the workbench maps that
name back to its local copy, and plain PEFT's AutoPeftModelForCausalLM loads the adapter by it
where the name resolves (here a hub cache laid out on disk, offline)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import REPO, repo
from workbench.cli import main
from workbench.config.recipe import load_recipe
from workbench.modeling import load
from workbench.modeling.tiny import tiny_model, tiny_tokenizer

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SHORT = ["train.max_steps=2", "train.eval_steps=null", "data.max_examples=32"]


def config_of(adapter) -> dict:
    return json.loads((adapter / "adapter_config.json").read_text())


def test_the_public_names():
    assert load.public_name("smollm2-135m-instruct") == HUB_ID
    assert load.public_name("gemma3-270m") == "google/gemma-3-270m"
    assert load.public_name("tiny-random-llama") == "tiny-random-llama"
    assert load.public_name("org/model") == "org/model"


def test_a_tiny_run_records_its_base_and_eval_needs_no_base_flag(tmp_path, capsys, monkeypatch):
    from workbench.training.run import train

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    run = train(load_recipe(repo("recipes/tiny.yaml"), SHORT), tmp_path / "run")
    assert config_of(run / "adapter")["base_model_name_or_path"] == "tiny-random-llama"  # was null
    adapter = shutil.copytree(run / "adapter", tmp_path / "elsewhere")  # no run.json beside it
    assert main(["eval", "--suite", repo("evals/tiny.yaml"), "--adapter", str(adapter), "--out",
                 str(tmp_path / "results.json")]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["base"]["model"] == "tiny-random-llama"


def test_the_default_is_recorded_by_its_hub_id_and_loads_by_it_in_plain_peft(tmp_path, monkeypatch):
    """The embedded default's conversion is stood in for by a tiny model, the same files laid out
    as the hub's cache for that name; AutoPeftModelForCausalLM runs offline in its own process."""
    from workbench.training.run import train

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    local = tmp_path / "converted"
    tiny_model(len(tiny_tokenizer())).save_pretrained(local)
    tiny_tokenizer().save_pretrained(local)
    monkeypatch.setattr(load, "ensure_named_model", lambda name: local)
    run = train(load_recipe(repo("recipes/tiny.yaml"), [*SHORT, "model.name=smollm2-135m-instruct"]),
                tmp_path / "run")
    assert config_of(run / "adapter")["base_model_name_or_path"] == HUB_ID
    assert config_of(run / "checkpoints" / "checkpoint-2")["base_model_name_or_path"] == HUB_ID
    assert load.resolve_model_dir(HUB_ID) == local  # the workbench maps the name to its copy

    hub = tmp_path / "hub"
    repo_dir = hub / f"models--{HUB_ID.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(local, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    script = textwrap.dedent(f"""
        import torch
        from peft import AutoPeftModelForCausalLM
        model = AutoPeftModelForCausalLM.from_pretrained({str(run / 'adapter')!r}).eval()
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        with torch.no_grad():
            tuned = model(input_ids=ids).logits
            with model.disable_adapter():
                base = model(input_ids=ids).logits
        print(model.peft_config["default"].base_model_name_or_path, float((tuned - base).abs().max()) > 0)
    """)
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == [HUB_ID, "True"]
    # the negative control: without the name in the cache, plain PEFT cannot find the base
    env["HF_HUB_CACHE"] = str(tmp_path / "empty")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
