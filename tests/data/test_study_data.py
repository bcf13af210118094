"""The study's vendored data: checksums, counts, fields, disjoint parts, GSM8K's final answers,
and the recipes and suites that name them. Reads only the files shipped in the package."""

from __future__ import annotations

import fnmatch
import re
import shutil
import tomllib

import pytest

from tests.helpers import REPO
from workbench.config.recipe import load_recipe
from workbench.data import vendored
from workbench.data.examples import general_text_examples
from workbench.data.gsm8k import final_answer, strip_calculator
from workbench.data.sources import read_records
from workbench.errors import UsageError
from workbench.evals.suite import load_suite
from workbench.modeling.tiny import tiny_tokenizer

COUNTS = {"gsm8k": 1000, "gsm8k_test": 250, "nq_open": 1000, "nq_open_test": 250,
          "factbook": 209, "factbook_heldout": 52}


# ---------------------------------------------------------------- checksums and packaging


@pytest.mark.parametrize("damage", ["flip", "truncate", "append"])
def test_a_damaged_copy_is_refused_in_one_line(tmp_path, damage):
    name = "gsm8k/test.jsonl"
    copy = tmp_path / name
    copy.parent.mkdir()
    shutil.copyfile(vendored.VENDOR / name, copy)
    assert vendored.vendored(name, root=tmp_path) == vendored.vendored(name)  # intact: read alike
    data = bytearray(copy.read_bytes())
    if damage == "flip":
        data[1000] ^= 0x01
    elif damage == "truncate":
        del data[-10:]
    else:
        data += b'{"question": "extra", "answer": "#### 1"}\n'
    copy.write_bytes(bytes(data))
    with pytest.raises(UsageError) as caught:
        vendored.vendored(name, root=tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{copy}: damaged: sha256 ")
    assert vendored.SHA256[name] in message


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(UsageError, match=rf"^{re.escape(str(tmp_path / 'nq_open/test.jsonl'))}: vendored data "
                       "file not found"):
        vendored.vendored("nq_open/test.jsonl", root=tmp_path)


def test_every_vendored_file_is_pinned_licensed_and_packaged():
    files = {str(p.relative_to(vendored.VENDOR)) for p in vendored.VENDOR.rglob("*") if p.is_file()}
    assert {f for f in files if f.endswith(".jsonl")} == set(vendored.SHA256)
    folders = {f.split("/")[0] for f in files}
    assert {f"{folder}/LICENSE" for folder in folders} <= files
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for f in files:  # a wheel without them would fail every study recipe at run time
        assert any(fnmatch.fnmatch(f, p.removeprefix("vendor/")) for p in patterns["workbench.data"]), f


# ---------------------------------------------------------------- the sources


@pytest.mark.parametrize("name, count", COUNTS.items())
def test_sources_load_with_their_counts(name, count):
    assert len(read_records(f"builtin:{name}")) == count


@pytest.mark.parametrize("split", ["gsm8k", "gsm8k_test"])
def test_gsm8k_records_are_worked_solutions(split):
    for record in read_records(f"builtin:{split}"):
        assert record["prompt"].startswith("Question: ") and record["prompt"].endswith("\nAnswer:")
        completion = record["completion"]
        assert completion.startswith(" ") and "<<" not in completion and ">>" not in completion
        assert re.search(r"\n#### \S+$", completion), completion[-40:]
        assert re.fullmatch(r"-?\d+", record["final_answer"])  # GSM8K's answers are whole numbers


def test_nq_open_records_are_closed_book_answers():
    for record in read_records("builtin:nq_open") + read_records("builtin:nq_open_test"):
        assert re.fullmatch(r"Q: [^\n]+\?\nA:", record["prompt"])
        assert record["completion"] == " " + record["answers"][0]


@pytest.mark.parametrize("task, key", [("gsm8k", "prompt"), ("nq_open", "prompt")])
def test_train_and_test_parts_are_disjoint(task, key):
    train = {r[key].lower() for r in read_records(f"builtin:{task}")}
    test = {r[key].lower() for r in read_records(f"builtin:{task}_test")}
    assert len(train) == COUNTS[task] and len(test) == COUNTS[f"{task}_test"]  # no question twice
    assert not train & test


def test_factbook_parts_are_disjoint_and_cover_every_profile():
    train, heldout = read_records("builtin:factbook"), read_records("builtin:factbook_heldout")
    assert all(r["text"].strip() for r in train + heldout)
    assert not {r["name"] for r in train} & {r["name"] for r in heldout}
    assert not {r["text"] for r in train} & {r["text"] for r in heldout}
    assert len(train) + len(heldout) == len(vendored.vendored("factbook/factbook.jsonl")) == 261
    assert "Austria" in {r["name"] for r in train + heldout}


def test_factbook_heldout_makes_general_text_chunks():
    tok = tiny_tokenizer()  # byte-level: 162k characters are about 600 chunks of 256
    chunks = general_text_examples("builtin:factbook_heldout", tok, 256, 12, seed=0)
    assert len(chunks) == 12 and all(len(c["input_ids"]) == 256 for c in chunks)
    assert len({tuple(c["input_ids"]) for c in chunks}) == 12  # distinct cuts, no repetition


def test_an_unknown_builtin_suggests_the_study_sources():
    with pytest.raises(UsageError, match=r"did you mean 'builtin:gsm8k_test'\?"):
        read_records("builtin:gsm8k_tset")


# ---------------------------------------------------------------- GSM8K's final answer


@pytest.mark.parametrize("text, strict, expected", [
    ("Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18 every day.\n#### 18", False, "18"),
    (" 5 + 5 = 10\n#### 10\n\nQuestion: Tom has 3 apples", False, "10"),  # ran on: the first answer
    ("So he pays 1,200 + 300 = 1,500 dollars.\n#### 1,500", True, "1500"),
    ("#### $1,234.50", True, "1234.5"),
    ("#### -3", True, "-3"),
    ("#### 18.00", True, "18"),
    ("#### .5", True, "0.5"),
    ("#### 7 apples", True, "7"),
    ("The answer is 42.", True, None),  # no #### line: strict reads nothing
    ("The answer is 42.", False, "42"),  # flexible: the last number
    ("She had 3 cats and gave away 1, so 2 remain", False, "2"),
    ("He saved $3,000 in 2 years", False, "2"),
    ("no number at all", False, None),
    ("#### \n", True, None),
    ("#### \n5 more", True, None),  # the answer line is one line
    ("", False, None),
])
def test_final_answer_on_hand_written_cases(text, strict, expected):
    assert final_answer(text, strict=strict) == expected


def test_strip_calculator_keeps_the_arithmetic():
    upstream = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"
    assert strip_calculator(upstream) == "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18.\n#### 18"
    assert final_answer(strip_calculator(upstream)) == final_answer(upstream) == "18"


def test_final_answers_match_the_upstream_answer_lines():
    for item in vendored.vendored("gsm8k/test.jsonl"):
        expected = item["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert final_answer(item["answer"], strict=True) == expected


# ---------------------------------------------------------------- recipes and suites


@pytest.mark.parametrize("recipe, train, max_length", [("gsm8k_baseline", "builtin:gsm8k", 384),
                                                       ("nq_open_baseline", "builtin:nq_open", 64)])
def test_study_recipes_train_on_the_vendored_sets(recipe, train, max_length):
    loaded = load_recipe(REPO / "recipes" / "smollm2" / f"{recipe}.yaml")
    assert (loaded.data.train, loaded.data.val, loaded.data.max_length) == (train, None, max_length)
    assert loaded.family == "baseline"


@pytest.mark.parametrize("suite, heldout", [("smollm2_gsm8k", "builtin:gsm8k_test"),
                                            ("smollm2_nq_open", "builtin:nq_open_test"),
                                            ("smollm2_factbook", None)])
def test_study_suites_hold_out_the_test_parts_and_read_prose(suite, heldout):
    loaded, _ = load_suite(REPO / "evals" / f"{suite}.yaml")
    assert loaded.general.source == "builtin:factbook_heldout"
    assert (loaded.target.heldout if loaded.target else None) == heldout
