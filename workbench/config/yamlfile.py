"""Reading YAML files and turning schema errors into one line that names the file and the key.

Recipes, eval suites, gate policies, sweep specs and lm-eval task files all come through here,
so every bad file reads the same way: `PATH: line N: invalid YAML: ...`, `PATH: unknown key
'a.b' (did you mean 'c'?)`.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from workbench.config.suggest import did_you_mean
from workbench.errors import UsageError


def yaml_problem(exc: yaml.YAMLError) -> str:
    """'line N: invalid YAML: what' on one line, whatever the parser's message spans."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}: " if mark else ""
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    return f"{where}invalid YAML: {problem}"


def read_yaml(path: Path, kind: str = "recipe", loader: type = yaml.SafeLoader) -> dict:
    """A YAML mapping, loaded safely (no `!!python` tags); `kind` names the file in errors."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: {kind} file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: {yaml_problem(exc)}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a {kind} must be a mapping of keys, got {type(data).__name__}")
    return data


def key_path(loc: tuple) -> str:
    """A pydantic error location as the user writes it: ('rules', 2, 'at') -> 'rules[2].at'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _annotation_types(annotation) -> list:
    """The classes inside an annotation: X, X | None and list[X] all give X."""
    args = getattr(annotation, "__args__", ())
    if not args:
        return [annotation]
    return [t for arg in args for t in _annotation_types(arg)]


def _fields_at(loc: tuple, model: type[BaseModel]) -> list[str]:
    """Names of the fields of the sub-schema that `loc` (a pydantic error location) points into."""
    for part in loc[:-1]:
        if isinstance(part, int):  # an index into a list field: the model is already its item type
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        candidates = [t for t in _annotation_types(field.annotation)
                      if isinstance(t, type) and issubclass(t, BaseModel)]
        if not candidates:
            return []
        model = candidates[0]
    return list(model.model_fields)


def describe_error(exc: ValidationError, model: type[BaseModel]) -> str:
    """The first validation error as one line: the key, what is wrong, a suggestion."""
    err = exc.errors()[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    key = key_path(loc)
    if err["type"] == "extra_forbidden":
        return f"unknown key '{key}'{did_you_mean(str(loc[-1]), _fields_at(loc, model), cutoff=0.5)}"
    if err["type"] == "missing":
        return f"missing required key '{key}'"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error" and not loc:
        return msg
    got = err.get("input")
    shown = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
    return f"{key}: {msg}{shown}"
