"""Hand-built results.json dicts for the compare tests (the shape of tests/test_gate.py's)."""

import json
import math

LEARNING = "learning.val_loss.tuned"
KL = "retention.general.kl"
ACC = "retention.mc.all.acc.delta"
SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)


def metric(value, half=0.00196):
    """A metric record whose 95% CI has half-width `half` (se = half / 1.96; default se 0.001);
    half=None gives a value-only record."""
    return {"value": value} if half is None else {"value": value, "ci": [value - half, value + half]}


def entry(family, scale, learning, forgetting, *, seed=None, step=None, half=0.00196, name=None,
          legacy=False):
    """One entry: `forgetting` maps metric names to values, every metric with the same CI."""
    metrics = {LEARNING: metric(learning, half), **{m: metric(v, half) for m, v in forgetting.items()}}
    e = {"name": name or f"{family}@{scale:g}" + (f"-s{seed}" if seed else "") + (f"-t{step}" if step else ""),
         "adapter": f"runs/{family}/adapter", "run": None, "scale": scale, "changes_model": scale != 0,
         "metrics": metrics, "curves": {}}
    if not legacy:  # files before families carry no family, seed or step
        e.update(family=family, seed=seed or 0, step=step)
    return e


def sweep(family, kl=lambda s: 0.2 * s * s, shift=0.0, *, learning=lambda s: 2.0 - s, scales=SCALES, **kw):
    """A family's adapter-scale sweep: learning 2.0 - s (val loss 2.0 at the base, 1.0 tuned) and
    forgetting kl(s) + shift; a convex trade-off, so every point is on the front."""
    return [entry(family, s, learning(s), {KL: kl(s) + shift}, **kw) for s in scales]


def results(*entries, fingerprint=None):
    suite = {"name": "t"} | ({"fingerprint": fingerprint} if fingerprint else {})
    return {"schema_version": 1, "kind": "workbench.eval", "created": "2026-01-01T00:00:00+00:00",
            "suite": suite, "base": {"model": "tiny-random-llama"}, "versions": {},
            "entries": [e for group in entries for e in (group if isinstance(group, list) else [group])]}


def write(tmp_path, data, name="results.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


# ---------------------------------------------------------------- entries with per-item scores


def scored(family, scale, *, general, target, mc=None, seed=0, light=False, name=None):
    """An entry as `workbench eval` writes it (schema 2): its metrics computed from per-item scores
    the way the evaluator computes them, with the evaluator's bootstrap CIs, and the items stored.

    general: dict of [n] arrays tokens, base_nll, tuned_nll (per chunk sums), kl, kl_upper,
    top1_agreement; target: tokens, base_nll, tuned_nll; mc: {task: acc_base, acc_tuned, acc_norm_base,
    acc_norm_tuned}. Keys are fixed per component ("g", "t", "mc:<task>"): every entry built here is
    scored on the same items."""
    import numpy as np

    from workbench.evals import metrics as M
    from workbench.formats.results import items_record, metric as record

    out, items = {}, {}
    g = {k: np.asarray(v, dtype=float) for k, v in general.items()}
    b, t = np.stack([g["base_nll"], g["tokens"]], 1), np.stack([g["tuned_nll"], g["tokens"]], 1)
    ppl = M.ratio_bootstrap_ci(b, t, n_boot=200)
    out["retention.general.ppl.base"] = record(ppl["base"])
    out["retention.general.ppl.tuned"] = record(ppl["tuned"], (ppl["tuned_ci_low"], ppl["tuned_ci_high"]))
    out["retention.general.ppl.ratio"] = record(ppl["ratio"], (ppl["ci_low"], ppl["ci_high"]))
    for col in ("kl", "kl_upper", "top1_agreement"):
        ci = M.paired_bootstrap_ci(np.zeros_like(g[col]), g[col], n_boot=200)
        out[f"retention.general.{col}"] = record(ci["tuned"], (ci["ci_low"], ci["ci_high"]))
    items["general"] = items_record("g", **g)
    tg = {k: np.asarray(v, dtype=float) for k, v in target.items()}
    learn = M.ratio_bootstrap_ci(np.stack([tg["base_nll"], tg["tokens"]], 1), np.stack([tg["tuned_nll"], tg["tokens"]], 1),
                                 n_boot=200)
    log = math.log
    out["learning.val_loss.base"] = record(log(learn["base"]))
    out["learning.val_loss.tuned"] = record(log(learn["tuned"]), (log(learn["tuned_ci_low"]), log(learn["tuned_ci_high"])))
    out["learning.val_loss.delta"] = record(log(learn["ratio"]), (log(learn["ci_low"]), log(learn["ci_high"])))
    items["target"] = items_record("t", **tg)
    if mc and not light:
        pooled = {}
        for task, cols in mc.items():
            items.setdefault("mc", {})[task] = items_record(f"mc:{task}", **cols)
            for k, v in cols.items():
                pooled.setdefault(k, []).extend(v)
        for task, cols in [*mc.items(), ("all", pooled)]:
            for score in ("acc", "acc_norm"):
                ci = M.paired_bootstrap_ci(cols[f"{score}_base"], cols[f"{score}_tuned"], n_boot=200)
                out[f"retention.mc.{task}.{score}.base"] = record(ci["base"])
                out[f"retention.mc.{task}.{score}.tuned"] = record(ci["tuned"])
                out[f"retention.mc.{task}.{score}.delta"] = record(ci["delta"], (ci["ci_low"], ci["ci_high"]))
    return {"name": name or f"{family}@{scale:g}" + (f"-s{seed}" if seed else ""), "adapter": f"runs/{family}",
            "run": None, "family": family, "seed": seed, "step": None, "scale": scale, "light": light,
            "changes_model": scale != 0, "metrics": out, "curves": {}, "items": items}


def synthetic_study(families=(("baseline", 1.0, 1.0, 3), ("kl", 0.7, 0.85, 2), ("ewc", 0.9, 0.9, 1),
                              ("short", 0.5, 0.5, 1)),
                    scales=(0.25, 0.5, 0.75, 1.0), n_chunks=12, n_mc=100, n_target=64, seed=0):
    """A study shaped like `make study`'s, from per-item scores with realistic correlation.

    Items have fixed traits every entry shares: a chunk's difficulty and its sensitivity to the
    fine-tune, a held-out example's difficulty and how fast it is learned, a multiple-choice
    item's chance of being lost. An entry of a family with forgetting strength f and learning
    strength l at adapter scale s, seed k: each chunk's NLL per token rises by F * sens_i with
    F = f * s^2 * (1 + 0.1 z_k), plus the entry's own noise; each example's NLL falls by
    L * speed_j, L = 8 l s^0.7 (1 + 0.05 z_k); an item is lost when its threshold u_i (plus
    entry noise) is below 0.3 F / (1 + F). families: (name, f, l, seeds). The last scale is the
    full adapter; the rest are light points (learning and general text only), as in the study."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = np.full(n_chunks, 256.0)
    base_tok = 2.5 + 0.4 * rng.standard_normal(n_chunks)
    sens = rng.lognormal(0.0, 0.6, n_chunks)
    t_tokens = rng.integers(3, 9, n_target).astype(float)
    t_base = 11.8 + 1.5 * rng.standard_normal(n_target)
    speed = rng.lognormal(0.0, 0.4, n_target)
    correct = (rng.random(n_mc) < 0.7).astype(float)
    threshold = rng.random(n_mc)
    entries = []
    for family, f, learn, n_seeds in families:
        for k in range(n_seeds):
            z = rng.standard_normal()
            for s in scales:
                F = f * s * s * (1 + 0.1 * z)
                L = 8 * learn * s ** 0.7 * (1 + 0.05 * z)
                per_tok = base_tok + F * sens + 0.01 * F * rng.standard_normal(n_chunks)
                kl = np.maximum(0.0, 0.5 * F * sens + 0.01 * F * rng.standard_normal(n_chunks))
                general = {"tokens": tokens, "base_nll": base_tok * tokens, "tuned_nll": per_tok * tokens,
                           "kl": kl, "kl_upper": kl * 1.1, "top1_agreement": np.clip(1 - 0.2 * kl, 0, 1)}
                tuned = np.maximum(0.05, t_base - L * speed + 0.05 * L * rng.standard_normal(n_target))
                target = {"tokens": t_tokens, "base_nll": t_base * t_tokens, "tuned_nll": tuned * t_tokens}
                lost = (threshold + 0.05 * rng.standard_normal(n_mc)) < 0.3 * F / (1 + F)
                acc = correct * ~lost
                mc = {"task": {"acc_base": correct, "acc_tuned": acc, "acc_norm_base": correct, "acc_norm_tuned": acc}}
                entries.append(scored(family, s, general=general, target=target, mc=mc, seed=k,
                                      light=s != scales[-1]))
    return entries
