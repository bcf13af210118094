"""A hand-built study for the report's fronts and matched-learning table: a reference family
(`baseline`, adapter scales), a regularizer that forgets less at the same learning (`kl`), one
with two seeds that forgets as much (`ewc`) and a run whose perplexity ratio is an outlier."""

from workbench.formats.results import KIND, SCHEMA_VERSION, metric

SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)


def point(family, scale, *, learns=1.2, forgets=0.15, seed=0, extra=0.0):
    """One entry at an adapter scale: val loss 3.0 - learns * s; perplexity ratio
    1 + forgets * s^2 + extra, KL and the accuracy drop growing the same way."""
    ppl = 1.0 + forgets * scale ** 2 + (extra if scale else 0.0)  # scale 0 is the base, exactly
    val = 3.0 - learns * scale
    acc = -0.25 * forgets * scale ** 2
    metrics = {
        "learning.val_loss.base": metric(3.0), "learning.val_loss.tuned": metric(val, (val - 0.02, val + 0.02)),
        "learning.exact_match.base": metric(0.1), "learning.exact_match.tuned": metric(0.1 + 0.35 * learns * scale),
        "retention.general.ppl.ratio": metric(ppl, (ppl - 0.004, ppl + 0.004)),
        "retention.general.kl": metric(0.6 * (ppl - 1.0), (0.6 * (ppl - 1) - 0.002, 0.6 * (ppl - 1) + 0.002)),
        "retention.mc.all.acc.delta": metric(acc, (acc - 0.012, acc + 0.012)),
    }
    name = family if scale == 1.0 else f"{family}@{scale:g}"
    return {"name": name + (f"-s{seed}" if seed else ""), "adapter": f"runs/{family}/adapter", "run": None,
            "family": family, "seed": seed, "step": None, "scale": scale, "changes_model": scale != 0,
            "metrics": metrics, "curves": {}}


def study(reference="baseline") -> list[dict]:
    entries = [point(reference, s) for s in SCALES]
    entries += [point("kl", s, learns=1.15, forgets=0.07) for s in SCALES]
    entries += [point("ewc", s, learns=1.2, forgets=0.15, seed=seed, extra=0.002 * seed)
                for seed in (0, 1) for s in SCALES]
    entries += [point("hot_lr", s, learns=1.5, forgets=1.8) for s in (0.5, 1.0)]
    return entries


def results(entries) -> dict:
    return {"schema_version": SCHEMA_VERSION, "kind": KIND, "created": "2026-11-22T10:00:00+00:00",
            "suite": {"name": "tiny", "path": "evals/tiny.yaml", "fingerprint": "abc"},
            "base": {"model": "tiny-random-llama", "fingerprint": "def", "cache": "hit"},
            "versions": {"workbench": "0.1.0"}, "entries": entries}
