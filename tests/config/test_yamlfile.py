import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from workbench.config.suggest import did_you_mean
from workbench.config.yamlfile import describe_error, key_path, read_yaml
from workbench.errors import UsageError


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    threshold: float = 0.0


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rules: list[Inner] = []
    name: str = ""


def error(data) -> ValidationError:
    with pytest.raises(ValidationError) as exc:
        Outer.model_validate(data)
    return exc.value


def test_did_you_mean():
    assert did_you_mean("kl_to_bse", ["kl_to_base", "ewc"]) == " (did you mean 'kl_to_base'?)"
    assert did_you_mean("pydco", ["pydoc"], prefix="builtin:") == " (did you mean 'builtin:pydoc'?)"
    assert did_you_mean("zzz", ["kl_to_base", "ewc"]) == ""


def test_describe_error_names_the_key_with_list_indices_and_suggests():
    assert key_path(("rules", 2, "at")) == "rules[2].at"
    assert describe_error(error({"rules": [{}, {"treshold": 1}]}), Outer) == \
        "unknown key 'rules[1].treshold' (did you mean 'threshold'?)"
    assert describe_error(error({"rules": [{"threshold": "high"}]}), Outer).startswith("rules[0].threshold: ")


@pytest.mark.parametrize("content, expected", [
    ("a: [unclosed\n", "line 2: invalid YAML"),
    ("- a\n- b\n", "a recipe must be a mapping of keys, got list"),
    ("x: !!python/object/apply:os.system ['true']\n", "invalid YAML: could not determine a constructor"),
    (b"\xff\xfe", "not UTF-8 text"),
])
def test_a_bad_yaml_file_is_one_line_naming_it(tmp_path, content, expected):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UsageError) as exc:
        read_yaml(path)
    assert str(exc.value).startswith(f"{path}: ") and expected in str(exc.value) and "\n" not in str(exc.value)


def test_a_missing_file_names_its_kind(tmp_path):
    with pytest.raises(UsageError, match="suite file not found"):
        read_yaml(tmp_path / "none.yaml", kind="suite")
