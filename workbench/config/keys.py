"""Every key of a schema, with its type, default and one-line description, read off the pydantic
fields: what `workbench recipes --keys` prints, what the key tables in docs/recipes.md and
docs/evals.md are generated from (`markdown_tables`; a test keeps them equal), and the check that
no field goes undescribed (`undescribed`). No torch."""

from __future__ import annotations

import json
import re
import types
from typing import Any, Literal, NamedTuple, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from workbench.config.suggest import did_you_mean
from workbench.errors import UsageError


SEPARATOR = r"\.|\[\]\."  # between a key's parts: multiple_choice[].limit


class Key(NamedTuple):
    key: str  # dotted; `[]` marks the items of a list of sections, as in multiple_choice[].limit
    type: str
    default: str
    description: str | None


def keys(model: type[BaseModel], prefix: str = "") -> list[Key]:
    """Every field of `model` and of the sections nested in it, depth first, in declaration order."""
    rows = []
    for name, field in model.model_fields.items():
        key = prefix + name
        kind, bounds = _type(field.annotation), _bounds(field)
        kind = f"{kind.removesuffix(' or null')}{bounds}{' or null' if kind.endswith(' or null') else ''}"
        rows.append(Key(key, kind, _default(field), field.description))
        for section, suffix in _sections(field.annotation):
            rows += keys(section, f"{key}{suffix}.")
    return rows


def undescribed(model: type[BaseModel]) -> list[str]:
    """The keys whose description is missing, empty or longer than one line."""
    return [k.key for k in keys(model) if not (k.description or "").strip() or "\n" in k.description]


def under(rows: list[Key], prefix: str, what: str) -> list[Key]:
    """The rows at `prefix` and below it (all of them for ''), or a UsageError naming `what`."""
    if not prefix:
        return rows
    chosen = [k for k in rows if k.key == prefix or k.key.startswith(prefix + ".")]
    if not chosen:
        raise UsageError(f"{what}: no key {prefix!r}{did_you_mean(prefix, [k.key for k in rows])}")
    return chosen


def text_table(rows: list[Key]) -> str:
    """Aligned columns for a terminal: key, type, default, description."""
    widths = [min(max(len(getattr(k, col)) for k in rows), cap)
              for col, cap in (("key", 44), ("type", 24), ("default", 22))]
    return "".join(f"{k.key:{widths[0]}}  {k.type:{widths[1]}}  {k.default:{widths[2]}}  {k.description}\n"
                   for k in rows)


def markdown_tables(model: type[BaseModel], top: str = "top level") -> str:
    """One Markdown table of the top-level keys (headed `top`), then one per section they hold."""
    rows = keys(model)
    groups = {top: [k for k in rows if "." not in k.key]}
    for k in rows:
        if "." in k.key:
            groups.setdefault(f"`{re.split(SEPARATOR, k.key)[0]}`", []).append(k)
    return "\n".join(f"### {title}\n\n| key | type | default | description |\n|---|---|---|---|\n" + "".join(
        f"| {_code(k.key)} | {_cell(k.type)} | {_code(k.default)} | {_cell(k.description or '')} |\n"
        for k in group) for title, group in groups.items())


def _code(text: str) -> str:
    """A code span in a Markdown table cell (a pipe would end the cell)."""
    return "`" + text.replace("|", "\\|") + "`"


def _cell(text: str) -> str:
    """Text safe in a Markdown table cell: pipes escaped, and `<` outside code spans, where it would
    open an HTML tag (runs/<name>)."""
    spans = text.replace("|", "\\|").split("`")
    return "`".join(s if i % 2 else s.replace("<", "\\<") for i, s in enumerate(spans))


def _sections(annotation: Any) -> list[tuple[type[BaseModel], str]]:
    """The models an annotation holds (a section, an optional one, a list of them), with the
    suffix their keys take."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, "")]
    if get_origin(annotation) is list:
        return [(model, "[]" + suffix) for model, suffix in _sections(get_args(annotation)[0])]
    if get_origin(annotation) in (Union, types.UnionType):
        return [found for arg in get_args(annotation) for found in _sections(arg)]
    return []


def _type(annotation: Any) -> str:
    """int, str or null, {nll, dft} for a Literal, section for a nested model, list[...], dict[...]."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return "{" + ", ".join(map(str, args)) + "}"
    if origin in (Union, types.UnionType):
        return " or ".join(_type(arg) for arg in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type(arg) for arg in args)}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field: FieldInfo) -> str:
    """The constraints: ' >= 1', ' > 0', ' in [0, 1)', ', at least 1 item'."""
    low = high = None  # (bound, included)
    for m in field.metadata:
        if isinstance(m, annotated_types.Ge):
            low = (m.ge, True)
        elif isinstance(m, annotated_types.Gt):
            low = (m.gt, False)
        elif isinstance(m, annotated_types.Le):
            high = (m.le, True)
        elif isinstance(m, annotated_types.Lt):
            high = (m.lt, False)
        elif isinstance(m, annotated_types.MinLen):
            return f", at least {m.min_length} item{'s' if m.min_length > 1 else ''}"
    if low and high:
        return f" in {'[' if low[1] else '('}{low[0]:g}, {high[0]:g}{']' if high[1] else ')'}"
    if low:
        return f" {'>=' if low[1] else '>'} {low[0]:g}"
    return f" {'<=' if high[1] else '<'} {high[0]:g}" if high else ""


def _default(field: FieldInfo) -> str:
    """The default as it would be written in YAML; `required` when there is none."""
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "{}"  # the section with every default: what `key: {}` gives
    if isinstance(value, str):
        return json.dumps(value) if "\n" in value or not value else value  # one line: newlines escaped
    return json.dumps(value)
