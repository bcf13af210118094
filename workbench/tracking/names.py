"""What a W&B run is called and configured with, derived from the recipe: its group (the recipe
family), its name (`<recipe>-<hash of what trains>`), its flat config, its lineage, and whether
it runs online, offline or not at all.

Nothing here imports wandb, transformers or torch: `workbench sweep --dry-run` names its W&B
metrics through this module without loading either.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from workbench.config.penalties import PENALTY_CONFIGS
from workbench.config.recipe import Recipe, WandbSection, read_yaml, resolved
from workbench.io import fingerprint

DEFAULT_HOSTS = ["api.forge.coreweave.com", "api.wandb.ai"]  # wandb 0.31's default host, and the one before


def family(recipe_path: str | Path) -> str:
    """The recipe family, the default W&B group: the folder a recipe sits in (`smollm2`), or for
    a recipe directly under `recipes/` the root of its `extends` chain (`tiny_all` -> `tiny`)."""
    path = Path(recipe_path).resolve()
    if path.parent.name != "recipes":
        return path.parent.name
    for _ in range(32):  # load_recipe has refused cycles already; the bound only guards misuse
        parent = read_yaml(path).get("extends")
        if not isinstance(parent, str):
            break
        path = (path.parent / parent).resolve()
    return path.stem


def enable(recipe: Recipe, recipe_path: str | Path | None = None, on: bool = False) -> Recipe:
    """The recipe with its `wandb` section filled in (group from the family), or unchanged when
    tracking is off (no section and no `--wandb`)."""
    if recipe.wandb is None and not on:
        return recipe
    section = recipe.wandb or WandbSection()
    if section.group is None:
        group = family(recipe_path) if recipe_path else recipe.name
        section = section.model_copy(update={"group": group})
    return recipe.model_copy(update={"wandb": section})


def recipe_hash(recipe: Recipe | dict) -> str:
    """A short hash of what the recipe trains: tracking settings and the output path left out,
    so the same knobs give the same hash wherever the run is written and however it is tracked."""
    data = resolved(recipe) if isinstance(recipe, Recipe) else dict(recipe)
    data.pop("wandb", None)
    data["train"] = {k: v for k, v in data.get("train", {}).items() if k != "output_dir"}
    return fingerprint(data)[:6]


def run_name(recipe: Recipe | dict) -> str:
    """`<recipe name>-<hash>`, unless the recipe names its W&B run."""
    data = resolved(recipe) if isinstance(recipe, Recipe) else recipe
    given = (data.get("wandb") or {}).get("name")
    return given or f"{data['name']}-{recipe_hash(data)}"


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; an empty or null section stays as one key."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def with_every_penalty(recipe: dict) -> dict:
    """The resolved recipe with every registered penalty present: one that is off (null) gets its
    schema's knobs at their defaults and weight 0, and `neftune_alpha` null becomes 0 (no noise).

    A baseline and a KL run then log the same config keys, so a W&B runs table or a
    parallel-coordinates plot shows `regularizers.kl_to_base.weight` as 0 on the baseline, not as an
    empty cell that drops the run from the plot."""
    data = {**recipe, "regularizers": dict(recipe.get("regularizers") or {})}
    regs = data["regularizers"]
    for name, config in PENALTY_CONFIGS.items():
        if regs.get(name) is None:
            regs[name] = config(weight=0.0).model_dump(mode="json")
    if "neftune_alpha" in regs and regs["neftune_alpha"] is None:
        regs["neftune_alpha"] = 0.0
    return data


def recipe_family(recipe: dict) -> str:
    """The family `workbench compare` pools a recipe's points into (results.json's `family`): the
    recipe's `family`, else its name."""
    return recipe.get("family") or recipe.get("name") or "recipe"


def run_config(recipe: dict, record: dict | None = None) -> dict[str, Any]:
    """What every W&B run of a fine-tune (train, eval, gate) logs as its config: the resolved recipe
    flattened with every penalty present, `family` (never null) and `seed`, and from run.json
    (`record`, a dict) the `run.*` fingerprints. Same keys for every recipe of one workbench."""
    record = record or {}
    config = flatten(with_every_penalty(recipe))
    config.pop("wandb", None)  # `wandb: null` on a run evaluated with --wandb only; W&B holds it anyway
    config = {k: v for k, v in config.items() if not k.startswith("wandb.")}
    config.update({"family": recipe_family(recipe), "seed": (recipe.get("train") or {}).get("seed"),
                   "run.recipe_hash": recipe_hash(recipe), "run.model_fingerprint": record.get("model_fingerprint"),
                   "run.train_fingerprint": (record.get("data") or {}).get("train_fingerprint"),
                   "run.world_size": record.get("world_size")})
    return config


MAX_TAG = 64  # W&B refuses a tag longer than 64 characters


def run_tags(recipe: dict) -> list[str]:
    """The recipe's own `wandb.tags`, then `family:<f>`, `model:<name>` (a local path by its last
    part), `seed:<n>` and each penalty that is on by name (`kl_to_base`), or `baseline` when none is:
    enough to filter a project's runs by what trained them without opening the config."""
    regs = recipe.get("regularizers") or {}
    on = [name for name in PENALTY_CONFIGS if (regs.get(name) or {}).get("weight", 0) > 0]
    on += ["base_replay"] if regs.get("base_replay") else []  # a data-side regularizer, no weight
    on += ["self_distill"] if (recipe.get("data") or {}).get("self_distill") else []
    on += ["flow"] if (recipe.get("train") or {}).get("example_weights") == "flow" else []  # weights the data
    on += ["osf"] if (recipe.get("lora") or {}).get("method") == "osf" else []  # another adapter, not LoRA
    model = str((recipe.get("model") or {}).get("name") or "")
    model = model if model.count("/") <= 1 and not model.startswith((".", "/")) else Path(model).name
    tags = [*((recipe.get("wandb") or {}).get("tags") or []), f"family:{recipe_family(recipe)}",
            f"model:{model}", f"seed:{(recipe.get('train') or {}).get('seed')}", *(on or ["baseline"])]
    return [t[:MAX_TAG] for t in dict.fromkeys(tags)]


def lineage(record: dict) -> dict:
    """Where an output came from (a run.json as a dict): the base weights, the training data,
    the recipe. Artifacts carry it as metadata."""
    return {"model_fingerprint": record.get("model_fingerprint"),
            "train_fingerprint": (record.get("data") or {}).get("train_fingerprint"),
            "recipe_hash": recipe_hash(record["recipe"]) if "recipe" in record else None,
            "base_model": (record.get("recipe") or {}).get("model", {}).get("name")}


def trainer_key(key: str) -> str:
    """A Trainer log key as a W&B key, as transformers' own WandbCallback names them:
    eval_loss -> eval/loss, the retention probe's retention_kl -> retention/kl, everything else under train/."""
    if key.startswith("retention_"):
        return f"retention/{key.removeprefix('retention_')}"
    return f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"


def has_api_key() -> bool:
    """Whether W&B could log in: WANDB_API_KEY, or a netrc entry for the W&B host. The key itself
    is never read out of the entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    base = os.environ.get("WANDB_BASE_URL")
    hosts = [urlsplit(base).netloc] if base else DEFAULT_HOSTS
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        entries = netrc.netrc(str(path))
    except (OSError, netrc.NetrcParseError):
        return False
    return any((entries.authenticators(host) or (None, None, None))[2] for host in hosts)


def resolve_mode(section: WandbSection) -> str:
    """online, offline or disabled. WANDB_MODE wins (a machine-wide choice); `auto` and `online`
    without an API key become offline, since online would stop at a login prompt."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    mode = {"dryrun": "offline", "run": "online"}.get(env, env) or section.mode
    if mode not in ("online", "offline", "disabled"):
        mode = "auto"
    if mode in ("auto", "online"):
        return "online" if has_api_key() else "offline"
    return mode
