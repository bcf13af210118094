"""Data loading, masking, splitting, replay and collation, on the byte-level tiny tokenizer."""

from __future__ import annotations

import json

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from workbench.data.examples import Collator, build_datasets, data_fingerprint, format_example, general_text_examples
from workbench.data.sources import read_records
from workbench.errors import UsageError
from workbench.config.recipe import DataSection, ReplaySection
from workbench.modeling.tiny import tiny_tokenizer

RECORDS = [{"prompt": "Reverse: abc\nAnswer: ", "completion": "cba"},
           {"prompt": "Say, with a comma: ", "completion": "42"},
           {"prompt": "unicode: ", "completion": "héllo ✓"}]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def task_records(n: int, prompt_len: int = 5) -> list[dict]:
    return [{"prompt": f"{i:03d}" + "p" * prompt_len, "completion": f"c{i:03d}"} for i in range(n)]


def as_keys(examples) -> set[tuple]:
    return {tuple(ex["input_ids"]) for ex in examples}


# ---------------------------------------------------------------- reading


def _jsonl(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", RECORDS)


def _json_array(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps(RECORDS), encoding="utf-8")
    return str(tmp_path / "d.json")


def _csv(tmp_path):
    pd.DataFrame(RECORDS).to_csv(tmp_path / "d.csv", index=False)
    return str(tmp_path / "d.csv")


def _parquet(tmp_path):
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "d.parquet")
    return str(tmp_path / "d.parquet")


def _saved_dataset(tmp_path):
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "ds"))
    return str(tmp_path / "ds")


def _saved_dataset_dict(tmp_path):
    splits = {"train": datasets.Dataset.from_list(RECORDS), "test": datasets.Dataset.from_list(RECORDS[:1])}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    return str(tmp_path / "dd")


@pytest.mark.parametrize("write", [_jsonl, _json_array, _csv, _parquet, _saved_dataset, _saved_dataset_dict])
def test_every_format_reads_the_same_records(tmp_path, write):
    assert read_records(write(tmp_path)) == RECORDS


def test_parquet_keeps_nested_messages(tmp_path):
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    pq.write_table(pa.Table.from_pylist(chat), tmp_path / "chat.parquet")
    assert read_records(str(tmp_path / "chat.parquet")) == chat


def test_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": oops}\n', encoding="utf-8")
    with pytest.raises(UsageError) as err:
        read_records(str(path))
    message = str(err.value)
    assert "data.jsonl:3: invalid JSON" in message and "\n" not in message


def test_non_utf8_line_is_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff\xfe", "completion": "b"}\n')
    with pytest.raises(UsageError, match=r"data\.jsonl:2: not UTF-8"):
        read_records(str(path))


def test_jsonl_line_must_be_an_object(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(UsageError, match=r"data\.jsonl:2: expected a JSON object, got list"):
        read_records(str(path))


@pytest.mark.parametrize("name, content, expected", [
    ("empty.jsonl", b"\n  \n", "no records"),
    ("empty.csv", b"", "no records"),
    ("notes.txt", b"hello", "unknown data format '.txt'"),
    ("bad.parquet", b"not parquet at all", "unreadable Parquet"),
    ("latin1.csv", b"prompt,completion\n\xe9t\xe9,x\n", "not UTF-8"),
])
def test_bad_files_are_one_line_usage_errors(tmp_path, name, content, expected):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UsageError) as err:
        read_records(str(tmp_path / name))
    assert name in str(err.value) and expected in str(err.value) and "\n" not in str(err.value)


def test_missing_file_and_non_dataset_dir(tmp_path):
    with pytest.raises(UsageError, match="nope.jsonl: data file not found"):
        read_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(UsageError, match="plain: not a dataset saved with save_to_disk"):
        read_records(str(tmp_path / "plain"))


def test_builtins(tmp_path):
    reverse = read_records("builtin:tiny_reverse")
    assert len(reverse) == 256 and reverse == read_records("builtin:tiny_reverse")
    word = reverse[0]["prompt"].removeprefix("Reverse: ").removesuffix("\nAnswer: ")
    assert word.isalpha() and reverse[0]["completion"] == word[::-1]
    with pytest.raises(UsageError, match=r"did you mean 'builtin:tiny_reverse'\?"):
        read_records("builtin:tiny_revers")


# ---------------------------------------------------------------- masking


def unmasked_spans(example, tok) -> list[str]:
    """The decoded text of each contiguous run of positions that carry loss."""
    spans, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            spans, current = spans + [current], []
    return [tok.decode(s) for s in spans + ([current] if current else [])]


def test_prompt_completion_mask(tok):
    record = RECORDS[0]
    example = format_example(record, tok, "auto", 128, "r")
    n_prompt = len(tok(record["prompt"], add_special_tokens=False)["input_ids"])
    assert example["labels"][:n_prompt] == [-100] * n_prompt
    assert all(label != -100 for label in example["labels"][n_prompt:])
    assert unmasked_spans(example, tok) == ["cba<|endoftext|>"]
    assert example["attention_mask"] == [1] * len(example["input_ids"]) and not example["truncated"]


def test_messages_mask_covers_only_assistant_turns(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello!"}, {"role": "user", "content": "and?"},
                {"role": "assistant", "content": "bye"}]
    example = format_example({"messages": messages}, tok, "auto", 512, "r")
    assert example["input_ids"] == tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert unmasked_spans(example, tok) == ["hello!<|im_end|>", "bye<|im_end|>"]


def test_missing_field_names_the_record(tok, tmp_path):
    with pytest.raises(UsageError) as err:
        format_example({"prompt": "x", "text": "y"}, tok, "prompt_completion", 64, "train.jsonl record 4")
    assert str(err.value) == "train.jsonl record 4: missing field 'completion' (has: prompt, text)"
    with pytest.raises(UsageError, match="record 1: missing field 'messages'"):
        format_example({"prompt": "x"}, tok, "messages", 64, "record 1")
    path = write_jsonl(tmp_path / "train.jsonl", task_records(3) + [{"text": "plain"}])
    with pytest.raises(UsageError, match=r"train\.jsonl record 4: expected a 'messages' field"):
        build_datasets(DataSection(train=path, val_fraction=0.0), tok, seed=0)


def test_truncation_counted_and_fully_truncated_dropped(tok, tmp_path):
    records = task_records(6, prompt_len=3) + task_records(2, prompt_len=40)
    path = write_jsonl(tmp_path / "train.jsonl", records)
    built = build_datasets(DataSection(train=path, val_fraction=0.0, max_length=12), tok, seed=0)
    # Short ones: 6 prompt + 5 completion tokens (incl. eos) = 11, fit. Long ones: prompt alone > 12.
    assert built.stats["n_truncated"] == 2 and built.stats["n_dropped_all_masked"] == 2
    assert built.stats["n_train"] == 6 and built.stats["n_completion_tokens"] == 6 * 5
    built = build_datasets(DataSection(train=path, val_fraction=0.0, max_length=8), tok, seed=0)
    assert built.stats["n_truncated"] == 8 and built.stats["n_dropped_all_masked"] == 2
    assert all(len(ex["input_ids"]) <= 8 and ex["truncated"] for ex in built.train)


def test_all_examples_dropped_is_a_usage_error(tok, tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", task_records(3, prompt_len=40))
    with pytest.raises(UsageError, match=r"long\.jsonl: no training examples left"):
        build_datasets(DataSection(train=path, val_fraction=0.0, max_length=8), tok, seed=0)


# ---------------------------------------------------------------- splits and replay


def test_val_fraction_split_is_deterministic_and_disjoint(tok, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", task_records(20))
    section = DataSection(train=path, val_fraction=0.25)
    first, again = build_datasets(section, tok, seed=0), build_datasets(section, tok, seed=0)
    assert (first.stats["n_train"], first.stats["n_val"]) == (15, 5)
    assert first.train == again.train and first.val == again.val
    assert not as_keys(first.train) & as_keys(first.val)
    assert len(as_keys(first.train) | as_keys(first.val)) == 20
    assert as_keys(build_datasets(section, tok, seed=1).val) != as_keys(first.val)


def test_small_fraction_still_holds_one_out(tok, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", task_records(3))
    built = build_datasets(DataSection(train=path, val_fraction=0.1), tok, seed=0)
    assert (built.stats["n_train"], built.stats["n_val"]) == (2, 1)
    built = build_datasets(DataSection(train=path, val_fraction=0.0), tok, seed=0)
    assert (built.stats["n_train"], built.stats["n_val"]) == (3, 0)


def test_val_file_and_max_examples(tok, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", task_records(10))
    val = write_jsonl(tmp_path / "val.jsonl", task_records(14)[10:])
    built = build_datasets(DataSection(train=train, val=val, val_fraction=0.5), tok, seed=0)
    assert (built.stats["n_train"], built.stats["n_val"]) == (10, 4)
    assert as_keys(built.val) == as_keys(format_example(r, tok, "auto", 512, "") for r in task_records(14)[10:])
    capped = build_datasets(DataSection(train=train, val=val, max_examples=3), tok, seed=0)
    assert capped.stats["n_train"] == 3 and capped.stats["n_val"] == 4


@pytest.mark.parametrize("ratio, n_task, n_replay", [(0.25, 30, 10), (0.5, 7, 7), (0.1, 20, 2)])
def test_replay_mix_follows_the_ratio(tok, tmp_path, ratio, n_task, n_replay):
    path = write_jsonl(tmp_path / "train.jsonl", task_records(n_task))
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": f"general text number {i}. " * 5} for i in range(20)])
    section = DataSection(train=path, val_fraction=0.0, max_length=16, replay=ReplaySection(source=text, ratio=ratio))
    built = build_datasets(section, tok, seed=0)
    assert built.stats["n_replay"] == n_replay and built.stats["n_train"] == n_task + n_replay
    replay = [ex for ex in built.train if ex["labels"] == ex["input_ids"]]
    assert len(replay) == n_replay and all(len(ex["input_ids"]) == 16 for ex in replay)
    assert build_datasets(section, tok, seed=0).train == built.train


# ---------------------------------------------------------------- general text


def test_general_text_from_pydoc(tok):
    topics = read_records("builtin:pydoc")
    assert len(topics) > 50 and sum(len(r["text"]) for r in topics) > 100_000
    chunks = general_text_examples("builtin:pydoc", tok, 64, 12, seed=3)
    assert chunks == general_text_examples("builtin:pydoc", tok, 64, 12, seed=3)
    assert chunks != general_text_examples("builtin:pydoc", tok, 64, 12, seed=4)
    assert len(chunks) == 12 and len(as_keys(chunks)) == 12
    assert all(len(c["input_ids"]) == 64 and c["labels"] == c["input_ids"] for c in chunks)
    assert all(c["attention_mask"] == [1] * 64 for c in chunks)
    assert sum(tok.decode(c["input_ids"]).count(" ") for c in chunks) > 12 * 5  # prose, not padding


def test_general_text_from_a_file_renders_every_record_kind(tok, tmp_path):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = write_jsonl(tmp_path / "mix.jsonl", [{"text": "abc"}, {"prompt": "de", "completion": "f"}, chat])
    (chunk,) = general_text_examples(path, tok, 30, 1)
    text = tok.decode(chunk["input_ids"])
    assert text.startswith("abc<|endoftext|>def<|endoftext|><|im_start|>user\nhi<|im_end|>")
    assert len(general_text_examples(path, tok, 8, 50)) == 50  # repeats when asked for more than it holds
    with pytest.raises(UsageError, match="fewer than max_length=100"):
        general_text_examples(path, tok, 100, 1)


# ---------------------------------------------------------------- fingerprint and collation


def test_data_fingerprint_is_stable_and_sensitive(tok):
    examples = [format_example(r, tok, "auto", 64, "") for r in RECORDS]
    same = [format_example(r, tok, "auto", 64, "") for r in RECORDS]
    assert data_fingerprint(examples) == data_fingerprint(same)
    same[1]["labels"][0] = same[1]["input_ids"][0]
    assert data_fingerprint(examples) != data_fingerprint(same)


def test_collator_right_pads(tok):
    features = [{"input_ids": [5, 6], "attention_mask": [1, 1], "labels": [-100, 6], "truncated": False},
                {"input_ids": [7, 8, 9, 10], "attention_mask": [1, 1, 1, 1], "labels": [7, 8, 9, 10]}]
    batch = Collator(pad_token_id=tok.pad_token_id)(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (2, 4) for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 0, 0], [7, 8, 9, 10]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 6, -100, -100], [7, 8, 9, 10]]
