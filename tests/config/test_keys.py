"""Every recipe, penalty and suite field carries a one-line description, and the key tables in
docs/recipes.md and docs/evals.md are the ones generated from the schemas."""

import re

import pytest
from pydantic import BaseModel, Field

from workbench.config.keys import keys, markdown_tables, undescribed
from workbench.config.penalties import PENALTY_CONFIGS
from workbench.config.recipe import Recipe
from workbench.evals.suite import Suite
from tests.helpers import REPO

SCHEMAS = {"recipe": Recipe, "suite": Suite} | {f"penalty {name}": cfg for name, cfg in PENALTY_CONFIGS.items()}


@pytest.mark.parametrize("schema", SCHEMAS.values(), ids=SCHEMAS.keys())
def test_every_field_has_a_one_line_description(schema):
    assert undescribed(schema) == []


def test_the_check_reports_a_missing_empty_or_multi_line_description():
    """Negative control: undescribed fields are found at any depth, in optional and listed sections."""
    class Inner(BaseModel):
        ok: int = Field(default=1, description="Described.")
        bare: int = 2

    class Outer(BaseModel):
        ok: str = Field(default="", description="Described.")
        blank: str = Field(default="", description=" ")
        wrapped: str = Field(default="", description="First line.\nSecond line.")
        inner: Inner | None = Field(default=None, description="A section.")
        many: list[Inner] = Field(default=[], description="Sections.")

    assert undescribed(Outer) == ["blank", "wrapped", "inner.bare", "many[].bare"]


def test_keys_read_type_bounds_and_default_off_the_field():
    rows = {k.key: k for k in keys(Recipe)}
    assert rows["train.learning_rate"][1:3] == ("float > 0", "0.0002")
    assert rows["data.val_fraction"][1:3] == ("float in [0, 1)", "0.1")
    assert rows["data.max_examples"][1:3] == ("int >= 1 or null", "null")
    assert rows["data.train"][1:3] == ("str", "required")
    assert rows["lora.target_modules"][1:3] == ("list[str] or {all-linear, attention, mlp}", "all-linear")
    assert rows["regularizers.kl_to_base"][1:3] == ("section or null", "null")
    assert rows["regularizers.kl_to_base.top_k"][1:3] == ("int >= 1", "256")
    assert rows["regularizers.base_replay.top_p"][1:3] == ("float in (0, 1]", "1.0")
    assert rows["model.tiny"][1:3] == ("section", "{}")
    assert rows["wandb.tags"][1:3] == ("list[str]", "[]")
    suite = {k.key: k for k in keys(Suite)}
    assert suite["multiple_choice[].limit"][1:3] == ("int >= 1 or null", "null")
    assert suite["lm_eval.tasks"][1:3] == ("list[str], at least 1 item", "required")


def test_every_field_is_a_key_once():
    """The walk reaches every field of every nested section: counted by hand from the schema."""
    names = [k.key for k in keys(Recipe)]
    assert len(names) == len(set(names))
    penalties = sum(len(cfg.model_fields) + 1 for cfg in PENALTY_CONFIGS.values())  # + the section's own key
    assert sum(n.startswith(("regularizers.kl_to_base", "regularizers.ewc", "regularizers.delta_l2"))
               for n in names) == penalties
    assert [n for n in names if n.startswith("train.early_stopping")] == [
        "train.early_stopping", "train.early_stopping.patience", "train.early_stopping.min_delta"]


@pytest.mark.parametrize("page, schema", [("recipes.md", Recipe), ("evals.md", Suite)])
def test_docs_tables_are_the_schema(page, schema):
    """The page carries the generated tables, and no key row outside them, so the two cannot drift."""
    doc = (REPO / "docs" / page).read_text()
    tables = markdown_tables(schema)
    assert tables in doc
    key_rows = re.findall(r"^\| `[^`]+` \| [^|]* \| `[^`]*` \| ", doc, re.M)
    assert len(key_rows) == len(keys(schema))


def test_markdown_cells_escape_what_would_break_the_table():
    class Model(BaseModel):
        path: str = Field(default="runs/<name>", description="KL(base || tuned) under runs/<name>, `a<b`.")

    assert markdown_tables(Model).splitlines()[-1] == (
        "| `path` | str | `runs/<name>` | KL(base \\|\\| tuned) under runs/\\<name>, `a<b`. |")
