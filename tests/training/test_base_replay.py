"""Base-sample replay on the tiny recipe: the pool is what the base generates, it is cached, every
batch holds its share, and its tokens carry the plain task loss."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import repo
from workbench.config.recipe import BaseReplay, load_recipe
from workbench.modeling.load import apply_lora, load_model, load_tokenizer
from workbench.scoring.masks import IGNORE
from workbench.training import base_replay
from workbench.training.base_generation import chunk_seed
from workbench.training.base_replay import generate_pool, start_ids
from workbench.training.run import build_trainer

# 20 samples: a chunk of 16 and one of 4. batch 10 at ratio 0.3: 3 replay + 7 task examples a batch
REPLAY = ["regularizers.base_replay.num_samples=20", "regularizers.base_replay.max_new_tokens=12",
          "regularizers.base_replay.ratio=0.3", "train.batch_size=10", "data.max_examples=40",
          "train.max_steps=2", "train.eval_steps=null"]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def generate_calls(monkeypatch):
    calls = []
    real = base_replay.generate_chunk

    def counted(*args, **kwargs):
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(base_replay, "generate_chunk", counted)
    return calls


def build(tmp_path, extra=()):
    return build_trainer(load_recipe(repo("recipes/tiny.yaml"), [*REPLAY, *extra]), tmp_path / "run")


def pool_of(trainer, record):
    n_task = record.data["base_replay"]["n_task"]
    return n_task, trainer.train_dataset[n_task:]


def direct_samples(model, tokenizer, cfg: BaseReplay, chunk: int, n: int) -> list[list[int]]:
    """model.generate called by hand under the chunk's seed, rows cut after their first eos."""
    start = start_ids(tokenizer, cfg.prefix)
    torch.manual_seed(chunk_seed("base_replay", cfg.seed, chunk))
    out = model.generate(input_ids=torch.tensor([start] * n), attention_mask=torch.ones(n, len(start), dtype=torch.long),
                         do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                         max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    rows = []
    for row in out.tolist():
        new = row[len(start):]
        eos = tokenizer.eos_token_id
        rows.append(start + (new[:new.index(eos) + 1] if eos in new else new))
    return rows


def test_pool_is_what_the_base_generates_and_run_json_records_it(tmp_path, generate_calls):
    trainer, record = build(tmp_path)
    n_task, pool = pool_of(trainer, record)
    recipe = load_recipe(repo("recipes/tiny.yaml"), REPLAY)
    cfg = recipe.regularizers.base_replay
    tokenizer = load_tokenizer(recipe.model)
    base, tokenizer = load_model(recipe.model, tokenizer)  # a fresh copy of the same base weights
    base.eval()
    with torch.no_grad():
        expected = direct_samples(base, tokenizer, cfg, 0, 16) + direct_samples(base, tokenizer, cfg, 1, 4)
    assert [ex["input_ids"] for ex in pool] == expected
    assert len({tuple(r) for r in expected}) == 20  # sampled, not one greedy string 20 times
    for ex in pool:  # the loss on every generated token, none on the BOS given
        assert ex["labels"] == [IGNORE] + ex["input_ids"][1:]
    assert generate_calls == [0, 1]
    br = record.data["base_replay"]
    assert br["num_samples"] == 20 and br["cached"] is False and br["per_batch"] == 3
    assert br["tokens"] == sum(len(r) - 1 for r in expected) > 0
    assert br["settings"]["temperature"] == 1.0 and br["settings"]["top_k"] == 0 and br["settings"]["seed"] == 0
    assert record.data["n_train"] == n_task + 20


def test_an_adapter_does_not_change_the_samples(tmp_path):
    """Generated from a PEFT model, the adapter is switched off (`as_base`): a nonzero adapter that
    does change what the model generates leaves the pool as the base's."""
    recipe = load_recipe(repo("recipes/tiny.yaml"), REPLAY)
    cfg = recipe.regularizers.base_replay
    tokenizer = load_tokenizer(recipe.model)
    model, tokenizer = load_model(recipe.model, tokenizer)
    plain = generate_pool(model, tokenizer, cfg)
    peft_model = apply_lora(model, recipe.lora, 0.0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    assert generate_pool(peft_model, tokenizer, cfg) == plain
    peft_model.eval()
    with torch.no_grad():
        tuned = direct_samples(peft_model, tokenizer, cfg, 0, 16)
    assert tuned != plain[:16]  # the control: with the adapter on, the samples differ


def test_a_second_run_reads_the_cache_and_a_damaged_entry_is_generated_again(tmp_path, generate_calls, capsys):
    first, record = build(tmp_path)
    assert generate_calls == [0, 1]
    again, cached = build(tmp_path)
    assert generate_calls == [0, 1]  # no generate call
    assert cached.data["base_replay"]["cached"] is True
    assert pool_of(again, cached)[1] == pool_of(first, record)[1]
    path = tmp_path / "cache" / "base_replay"
    (entry,) = path.glob("*.safetensors")
    raw = bytearray(entry.read_bytes())
    raw[-3] ^= 0xFF  # a flipped bit in the token ids
    entry.write_bytes(bytes(raw))
    capsys.readouterr()
    third, regenerated = build(tmp_path)
    lines = [line for line in capsys.readouterr().out.splitlines() if str(entry) in line and "again" in line]
    assert len(lines) == 1 and "damaged" in lines[0]
    assert generate_calls == [0, 1, 0, 1] and regenerated.data["base_replay"]["cached"] is False
    assert pool_of(third, regenerated)[1] == pool_of(first, record)[1]
    # other sampling settings are another entry
    build(tmp_path, ["regularizers.base_replay.temperature=0.7"])
    assert generate_calls == [0, 1, 0, 1, 0, 1] and len(list(path.glob("*.safetensors"))) == 2


def test_every_training_batch_holds_the_share_and_replay_tokens_carry_the_task_loss(tmp_path):
    trainer, record = build(tmp_path)
    n_task, pool = pool_of(trainer, record)
    replayed = {tuple(ex["input_ids"]) for ex in pool}
    loader = trainer.get_train_dataloader()
    seen = 0
    for batch in loader:
        rows = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        assert len(rows) == 10 and sum(row in replayed for row in rows) == 3  # round(0.3 * 10)
        seen += 1
    assert seen == -(-n_task // 7)  # the task set once, 7 a batch
    model = trainer.model
    model.train()
    loss = trainer.compute_loss(model, {k: v for k, v in batch.items()})
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    plain = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-6)
    replay_rows = torch.tensor([row in replayed for row in rows])
    assert (labels[replay_rows] != IGNORE).sum() > 0  # the replay rows carry labels into that loss
