import pytest
import yaml

from workbench.errors import UsageError
from workbench.config.recipe import load_recipe, parse_override, resolved
from tests.helpers import REPO, repo

RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)


@pytest.mark.parametrize("path", RECIPES, ids=str)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert resolved(recipe)["data"]["train"]


def test_shipped_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"tiny", "tiny_all", "baseline", "weight_decay", "lora_dropout", "kl_to_base", "ewc",
            "label_smoothing"} <= names


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_extends_merges_deeply_and_child_wins(tmp_path):
    write(tmp_path, "base.yaml", {"data": {"train": "a.jsonl", "max_length": 64},
                                  "regularizers": {"kl_to_base": {"weight": 0.5, "temperature": 2.0}}})
    child = write(tmp_path, "child.yaml", {"extends": "base.yaml",
                                           "regularizers": {"kl_to_base": {"weight": 0.1}}})
    recipe = load_recipe(child)
    assert recipe.data.max_length == 64
    assert recipe.regularizers.kl_to_base.weight == 0.1
    assert recipe.regularizers.kl_to_base.temperature == 2.0


def test_extends_cycle_is_refused(tmp_path):
    write(tmp_path, "a.yaml", {"extends": "b.yaml"})
    write(tmp_path, "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(UsageError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_dotted_overrides_are_typed_and_validated():
    recipe = load_recipe(repo("recipes/tiny.yaml"), ["regularizers.kl_to_base.weight=0.25",
                                               "train.max_steps=3", "lora.target_modules=[q_proj]",
                                               "train.learning_rate=1e-3"])
    assert recipe.regularizers.kl_to_base.weight == 0.25
    assert recipe.train.max_steps == 3 and recipe.lora.target_modules == ["q_proj"]
    assert recipe.train.learning_rate == 1e-3
    assert parse_override("a.b=[1, 2]") == {"a": {"b": [1, 2]}}
    with pytest.raises(UsageError, match="expected key.path=value"):
        parse_override("no_equals_sign")


@pytest.mark.parametrize("overrides, message", [
    (["regularizers.kl_to_bse.weight=1"], "unknown key 'regularizers.kl_to_bse' (did you mean 'kl_to_base'?)"),
    (["regularizers.ewc.estimtor=diag"], "did you mean 'estimator'?"),
    (["trian.max_steps=1"], "unknown key 'trian' (did you mean 'train'?)"),
    (["train.batch_size=abc"], "train.batch_size: Input should be a valid integer"),
    (["regularizers.lora_dropout=1.0"], "regularizers.lora_dropout: Input should be less than 1"),
    (["regularizers.label_smoothing=-0.1"], "regularizers.label_smoothing: Input should be greater"),
    (["regularizers.kl_to_base.weight=-1"], "regularizers.kl_to_base.weight: Input should be greater"),
    (["regularizers.kl_to_base.direction=sideways"], "regularizers.kl_to_base.direction"),
    (["train.max_steps=0"], "train.max_steps: Input should be greater than or equal to 1"),
    (["lora.enabled=false", "regularizers.kl_to_base.weight=1"], "kl_to_base act on the LoRA adapter"),
    (["lora.enabled=false", "train.retention_probe.every=5"], "train.retention_probe measures the tuned model"),
    (["regularizers.ewc.weight=5"], "regularizers.ewc needs a Fisher"),
    (["train.loss=dft", "regularizers.label_smoothing=0.1"], "train.loss dft with regularizers.label_smoothing"),
    (["train.loss=focal"], "train.loss: Input should be 'nll' or 'dft'"),
    (["lora.init=loftq"], "lora.init: Input should be 'default', 'gaussian', 'pissa'"),
    (["lora.init=pissa", "regularizers.weight_decay=0.01"], "lora.init pissa with regularizers.weight_decay 0.01"),
    (["lora.init=corda_kpm", "regularizers.lora_dropout=0.1"], "lora.init corda_kpm with regularizers.lora_dropout"),
    (["lora.layers=top"], "lora.layers: String should match pattern"),
    (["train.flow_temperature=1.5"], "train.flow_temperature is for example_weights flow, not none"),
    (["train.example_weights=easy"], "train.example_weights: Input should be 'none' or 'flow'"),
    (["lora.method=osf", "regularizers.delta_l2.weight=1"], "lora.method osf with regularizers.delta_l2: it acts on "
                                                              "LoRA's factors B @ A, which OSF has not"),
    (["lora.method=osf", "regularizers.ewc.weight=1", "regularizers.ewc.reference=builtin:pydoc"],
     "lora.method osf with regularizers.ewc"),
    (["lora.method=osf", "lora.init=pissa"], "lora.method osf with lora.init pissa"),
    (["lora.method=osf", "regularizers.lora_dropout=0.1"], "lora.method osf with regularizers.lora_dropout"),
    (["lora.method=osf", "regularizers.weight_decay=0.01"], "regularizers.weight_decay: decay would shrink"),
    (["lora.method=osf", "model.load_in_4bit=true"], "lora.method osf with model.load_in_4bit"),
    (["lora.method=vera"], "lora.method: Input should be 'lora' or 'osf'"),
    (["lora.layers=5-2"], "lora.layers 5-2: the first layer is after the last"),
    (["regularizers.kl_to_base.target=0"], "regularizers.kl_to_base.target: Input should be greater than 0"),
    (["regularizers.kl_to_base.target=0.1", "regularizers.kl_to_base.weight_min=2",
      "regularizers.kl_to_base.weight_max=1"], "regularizers.kl_to_base: weight_min 2 is above weight_max 1"),
    (["data.format=messages", "data.self_distill.rejected=original"],
     "data.self_distill rewrites each record's completion, and data.format messages has none"),
    (["data.self_distill.template=Say {prompt} again"], "data.self_distill.template needs {reference}"),
    (["data.self_distill.rejected=skip"], "data.self_distill.rejected: Input should be 'original' or 'drop'"),
])
def test_bad_recipes_give_one_line_naming_the_key(overrides, message):
    with pytest.raises(UsageError) as info:
        load_recipe(repo("recipes/tiny.yaml"), overrides)
    text = str(info.value)
    assert message in text and "\n" not in text and text.startswith(repo("recipes/tiny.yaml"))


def test_yaml_errors_name_the_file_and_line(tmp_path):
    path = write(tmp_path, "bad.yaml", "data:\n  train: x\n  max_length: [1,\n")
    with pytest.raises(UsageError, match=r"bad.yaml: line \d+: invalid YAML"):
        load_recipe(path)
    with pytest.raises(UsageError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_python_tags_are_refused(tmp_path):
    path = write(tmp_path, "evil.yaml", "data:\n  train: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(UsageError, match="invalid YAML"):
        load_recipe(path)
