"""Hand-built results.json dicts for the compare tests (the shape of tests/test_gate.py's)."""

import json

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
