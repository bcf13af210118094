"""Property-based: every malformed recipe or data file exits 2 with one line and writes nothing."""

import json
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench.cli import main

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

GOOD_RECORDS = [{"prompt": f"Reverse: {w}\nAnswer: ", "completion": w[::-1]} for w in ("abc", "hello", "xyz")]
BASE_RECIPE = {"model": {"name": "tiny-random-llama"}, "lora": {"r": 4, "alpha": 8},
               "data": {"max_length": 64}, "train": {"max_steps": 2, "batch_size": 2}}

# (section, key, a value the schema must refuse)
OUT_OF_RANGE = [("lora", "r", 0), ("lora", "alpha", -1.0), ("data", "max_length", 2),
                ("data", "val_fraction", 1.0), ("train", "batch_size", 0), ("train", "learning_rate", 0.0),
                ("regularizers", "lora_dropout", 1.0), ("regularizers", "label_smoothing", 1.0),
                ("regularizers", "weight_decay", -0.1), ("train", "max_steps", 0)]
WRONG_TYPE = [("lora", "r", "sixteen"), ("train", "batch_size", [1]), ("data", "max_length", {"a": 1}),
              ("train", "learning_rate", "fast"), ("model", "name", 3), ("lora", "target_modules", 5)]
SECTIONS = ["model", "lora", "data", "train", "regularizers"]
names = st.text(string.ascii_lowercase + "_", min_size=1, max_size=12)


def run_train(tmp_path, recipe_text: str, capsys) -> tuple[int, str]:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text)
    out = tmp_path / "out"
    code = main(["train", str(recipe), "--output-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert not out.exists(), "a refused run wrote outputs"
    return code, err


def assert_one_line(code: int, err: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err


def with_data(tmp_path, recipe: dict, data_file) -> dict:
    recipe = json.loads(json.dumps(recipe))
    recipe["data"]["train"] = str(data_file)
    return recipe


@st.composite
def malformed_recipes(draw):
    """A valid recipe with one thing broken, or text that is not a recipe at all."""
    kind = draw(st.sampled_from(["unknown_key", "range", "type", "regularizer", "yaml", "not_mapping"]))
    recipe = json.loads(json.dumps(BASE_RECIPE))
    if kind == "unknown_key":
        section = draw(st.sampled_from(SECTIONS + [None]))
        key = draw(names.filter(lambda k: k not in {"model", "lora", "data", "train", "regularizers", "name",
                                                     "description", "extends", "r", "alpha", "max_length",
                                                     "max_steps", "batch_size", "enabled", "seed", "epochs",
                                                     "dtype", "revision", "format", "val", "replay", "tiny"}))
        (recipe.setdefault(section, {}) if section else recipe)[key] = draw(st.integers())
    elif kind in ("range", "type"):
        section, key, value = draw(st.sampled_from(OUT_OF_RANGE if kind == "range" else WRONG_TYPE))
        recipe.setdefault(section, {})[key] = value
    elif kind == "regularizer":
        name = draw(st.sampled_from(["kl_to_base", "ewc", "delta_l2"]))
        recipe["regularizers"] = {name: {"weight": draw(st.floats(max_value=-1e-6, allow_nan=False))}}
    elif kind == "yaml":
        return "model: {name: [unclosed\n" + draw(st.text(max_size=20))
    else:
        return draw(st.sampled_from(["- 1\n- 2\n", "42\n", "just some text\n", "[model, lora]\n"]))
    return yaml.safe_dump(recipe)


@SETTINGS
@given(text=malformed_recipes())
def test_malformed_recipes_exit_2_with_one_line(tmp_path, capsys, text):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GOOD_RECORDS))
    parsed = yaml.safe_load(text) if not text.startswith("model: {name: [") else None
    if isinstance(parsed, dict) and isinstance(parsed.get("data"), dict):
        parsed["data"]["train"] = str(data)
        text = yaml.safe_dump(parsed)
    assert_one_line(*run_train(tmp_path, text, capsys))


@st.composite
def malformed_data(draw):
    """(file name, bytes): JSONL with one bad line, missing or mistyped fields, bad encodings."""
    records = [json.dumps(r) for r in GOOD_RECORDS]
    kind = draw(st.sampled_from(["bad_json", "missing_field", "wrong_type", "not_utf8", "empty", "not_object",
                                 "all_masked", "unknown_suffix"]))
    at = draw(st.integers(0, len(records)))
    if kind == "bad_json":
        records.insert(at, draw(st.text(min_size=1, max_size=30).filter(lambda t: _not_json(t) and "\n" not in t
                                                                        and "\r" not in t and t.strip())))
    elif kind == "missing_field":
        records.insert(at, json.dumps({draw(st.sampled_from(["prompt", "completion"])): "x"}))
    elif kind == "wrong_type":
        records.insert(at, json.dumps({"prompt": draw(st.integers()), "completion": "x"}))
    elif kind == "not_object":
        records.insert(at, json.dumps(draw(st.one_of(st.integers(), st.lists(st.integers())))))
    elif kind == "all_masked":  # every completion cut away by max_length: nothing to learn
        records = [json.dumps({"prompt": "p" * 200, "completion": "x"})]
    elif kind == "empty":
        return "data.jsonl", draw(st.sampled_from([b"", b"\n", b"\n\n  \n"]))
    elif kind == "not_utf8":
        return "data.jsonl", "\n".join(records).encode() + b"\n" + draw(st.sampled_from([b"\xff\xfe", b"\xc3\x28"])) + b"\n"
    elif kind == "unknown_suffix":
        return "data." + draw(st.sampled_from(["txt", "xml", "yaml"])), "\n".join(records).encode()
    return "data.jsonl", ("\n".join(records) + "\n").encode()


def _not_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return True
    return False


@SETTINGS
@given(case=malformed_data())
def test_malformed_data_files_exit_2_naming_the_file(tmp_path, capsys, case):
    name, content = case
    data = tmp_path / name
    data.write_bytes(content)
    code, err = run_train(tmp_path, yaml.safe_dump(with_data(tmp_path, BASE_RECIPE, data)), capsys)
    assert_one_line(code, err)
    assert str(data) in err


@pytest.mark.parametrize("text", ["!!python/object/apply:os.system ['echo pwned']\n",
                                  "model: !!python/name:os.system\n"])
def test_python_yaml_tags_are_refused(tmp_path, capsys, text):
    assert_one_line(*run_train(tmp_path, text, capsys))
