"""Self-distillation on the tiny recipe: the cached rewrites are what the base generates, a second
run reads them without generating, and run.json counts what the filter kept and dropped."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import GenerationConfig

from tests.helpers import repo
from workbench.config.recipe import load_recipe
from workbench.config.self_distill import DEFAULT_TEMPLATE
from workbench.data.examples import task_splits
from workbench.errors import UsageError
from workbench.modeling.load import load_model, load_tokenizer
from workbench.scoring.base_cache import unragged
from workbench.scoring.masks import pad_rows
from workbench.training import self_distill
from workbench.training.base_generation import chunk_seed
from workbench.training.run import build_trainer, train

# 24 records: a chunk of 16 prompts and one of 8
FAST = ["data.max_examples=24", "train.max_steps=1", "train.eval_steps=null"]
GREEDY = FAST + ["data.self_distill.max_new_tokens=12"]
# sampled and long enough that some rewrites end by themselves (about 1 in 5 on the random model)
SAMPLED = FAST + ["data.self_distill.temperature=1.0", "data.self_distill.max_new_tokens=48",
                  "data.self_distill.check_answer=false"]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def generate_calls(monkeypatch):
    calls = []
    real = self_distill.rewrite_chunk

    def counted(*args, **kwargs):
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(self_distill, "rewrite_chunk", counted)
    return calls


def setup(overrides):
    """The recipe, a fresh copy of the base, its tokenizer, and the training records in order."""
    recipe = load_recipe(repo("recipes/tiny.yaml"), overrides)
    tokenizer = load_tokenizer(recipe.model)
    seen = {}
    task_splits(recipe.data, tokenizer, recipe.train.seed, rewrite=lambda records, names: seen.setdefault("r", records))
    base, tokenizer = load_model(recipe.model, tokenizer)
    base.eval()
    return recipe, base, tokenizer, seen["r"]


def by_hand(tokenizer, record) -> list[int]:
    """The rewrite prompt built here from the template and the chat template, not by the workbench."""
    text = DEFAULT_TEMPLATE.replace("{prompt}", record["prompt"].strip()).replace("{reference}", record["completion"].strip())
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True, return_dict=True,
                                         add_generation_prompt=True)["input_ids"]


def cached(record_data) -> list[list[int]]:
    tensors = load_file(record_data["self_distill"]["path"])
    return [r.tolist() for r in unragged(tensors["values"], tensors["offsets"])]


def cut(row, stops):
    return next((row[:i + 1] for i, t in enumerate(row) if t in stops), row)


def test_greedy_rewrites_are_what_the_base_generates_one_prompt_at_a_time(tmp_path, generate_calls):
    """Batched, left-padded and sorted by length in the workbench; here each prompt alone, unpadded."""
    _, record = build_trainer(load_recipe(repo("recipes/tiny.yaml"), GREEDY), tmp_path / "run")
    assert generate_calls == [0, 1]
    recipe, base, tokenizer, records = setup(GREEDY)
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    expected = []
    with torch.no_grad():
        for r in records:
            prompt = torch.tensor([by_hand(tokenizer, r)])
            out = base.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                max_new_tokens=12, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
            expected.append(cut(out[0, prompt.shape[1]:].tolist(), stops))
    assert cached(record.data) == expected
    assert len({tuple(r) for r in expected}) > 1  # the prompts matter: not one string for all
    sd = record.data["self_distill"]
    assert sd["n_records"] == 24 and sd["cached"] is False and sd["tokens"] == sum(map(len, expected))
    assert sd["settings"]["temperature"] == 0.0 and sd["settings"]["template"] == DEFAULT_TEMPLATE


def test_run_json_counts_what_the_filter_kept_and_training_learns_the_kept_rewrites(tmp_path, generate_calls):
    run = json.loads((train(load_recipe(repo("recipes/tiny.yaml"), SAMPLED), tmp_path / "run") / "run.json").read_text())
    recipe, base, tokenizer, records = setup(SAMPLED)
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    prompts = [by_hand(tokenizer, r) for r in records]
    order = sorted(range(24), key=lambda i: -len(prompts[i]))
    rows = {}
    with torch.no_grad():  # each chunk of 16 as one left-padded batch under its seed
        for c, chunk in enumerate([order[:16], order[16:]]):
            ids, mask = pad_rows([prompts[i] for i in chunk], tokenizer.pad_token_id, side="left")
            torch.manual_seed(chunk_seed("self_distill", 0, c))
            config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=48,
                                      eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
            out = base.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            rows.update({i: cut(row[ids.shape[1]:], stops) for i, row in zip(chunk, out.tolist())})
    assert cached(run["data"]) == [rows[i] for i in range(24)]
    finished = [bool(rows[i]) and rows[i][-1] in stops for i in range(24)]
    texts = [tokenizer.decode(rows[i][:-1] if finished[i] else rows[i], skip_special_tokens=True).strip()
             for i in range(24)]
    kept = [f and bool(t) and "reference answer" not in t.lower() for f, t in zip(finished, texts)]
    sd = run["data"]["self_distill"]
    assert 0 < sum(kept) < 24  # both kinds, or the test shows nothing
    assert (sd["kept"], sd["dropped"], sd["dropped_by"]["unfinished"]) == (sum(kept), 24 - sum(kept), finished.count(False))
    assert sd["with_answer"] == 24  # tiny_reverse's references are one word
    # training learns each kept rewrite and each other record's reference, up to max_length
    trainer, _ = build_trainer(recipe, tmp_path / "again")
    assert generate_calls == [0, 1]  # the second build read the cache
    want = sorted(tuple((tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] + tokenizer(
        t if k else r["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:64])
        for r, t, k in zip(records, texts, kept))
    assert sorted(tuple(ex["input_ids"]) for ex in trainer.train_dataset) == want


def test_a_second_run_reads_the_cache_and_only_the_settings_it_depends_on_generate_again(tmp_path, generate_calls):
    first, record = build_trainer(load_recipe(repo("recipes/tiny.yaml"), SAMPLED), tmp_path / "run")
    assert generate_calls == [0, 1]
    again, cached_record = build_trainer(load_recipe(repo("recipes/tiny.yaml"), SAMPLED), tmp_path / "run")
    assert generate_calls == [0, 1]  # no generate call
    assert cached_record.data["self_distill"]["cached"] is True
    assert [ex["input_ids"] for ex in again.train_dataset] == [ex["input_ids"] for ex in first.train_dataset]
    # the filter runs after the cache: dropping the rejected rewrites generates nothing
    dropping, dropped = build_trainer(load_recipe(repo("recipes/tiny.yaml"), SAMPLED + ["data.self_distill.rejected=drop"]),
                                      tmp_path / "run")
    assert generate_calls == [0, 1] and len(dropping.train_dataset) == dropped.data["self_distill"]["kept"] > 0
    # another seed is another entry
    build_trainer(load_recipe(repo("recipes/tiny.yaml"), SAMPLED + ["data.self_distill.seed=1"]), tmp_path / "run")
    assert generate_calls == [0, 1, 0, 1] and len(list((tmp_path / "cache" / "self_distill").glob("*.safetensors"))) == 2


def test_nothing_kept_with_rejected_drop_is_one_line(tmp_path):
    recipe = load_recipe(repo("recipes/tiny.yaml"), FAST + ["data.self_distill.max_new_tokens=2",
                                                            "data.self_distill.rejected=drop"])
    with pytest.raises(UsageError, match=r"kept none of the 24 rewrites .*'unfinished': 24.* nothing is left to train"):
        build_trainer(recipe, tmp_path / "run")
