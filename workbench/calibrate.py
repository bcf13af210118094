"""`workbench calibrate`: the largest adapter scale whose eval passes a gate policy, as a new adapter.

Scaling an adapter's delta by s in [0, 1] interpolates in weight space from the base (s = 0) to
the fine-tune (s = 1), and forgetting shrinks with it: a free way to meet a forgetting budget
without retraining. The search is a bisection on s. Scale 1 is scored first and is the answer if
it passes; otherwise 0 (the base, which forgets nothing) is taken as passing without scoring it,
and [0, 1] is halved until the bracket is narrower than the tolerance. That finds the largest
passing scale only if pass/fail is monotone in s: a rule that needs learning
(`learning.val_loss.delta <= 0`) can fail at small scales while retention rules fail at large
ones, and then the search may find no passing scale; the failure says which rules broke where.

The model is loaded once (`evals.evaluate.open_session`) and every candidate is the same adapter
toggled to another scale (`modeling.lora.adapter_scale`); the base side of every component is
scored once (`BaseCache`). OUTDIR gets a standard PEFT adapter with s folded into its B matrices,
`results.json` of that scale and `calibration.json` with the search, all or nothing.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from safetensors import safe_open
from safetensors.torch import save_file

from workbench.distributed import init_distributed, is_main_process
from workbench.errors import RunFailed, UsageError
from workbench.evals.evaluate import ADAPTER_FILES, Session, open_session
from workbench.gate import OK_STATUSES, Check, Policy, check, load_policy
from workbench.formats.calibration import Calibration
from workbench.formats.integrity import write_manifest
from workbench.formats.results import Entry, Results
from workbench.io import write_json, writing
from workbench.modeling.lora import scaled_magnitudes

# LoRA's B factors (and a B bias, with lora_bias): PEFT multiplies each by `scaling` at run time,
# so B * s in the file is the adapter at scale s, whatever its alpha or rank pattern. DoRA's
# magnitudes are replaced by their values at s (`modeling.lora.adapter_scale`).
B_KEY = re.compile(r"\.lora_(embedding_)?B(\.|$)")
MAGNITUDE = ".lora_magnitude_vector"
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*", "vocab*",
                   "merges.txt")


@dataclass
class Step:
    """One scored scale of the search."""

    scale: float
    checks: list[Check]
    entry: Entry = field(repr=False)

    @property
    def passed(self) -> bool:
        return all(c.status in OK_STATUSES for c in self.checks)

    @property
    def failing(self) -> list[Check]:
        return [c for c in self.checks if c.status not in OK_STATUSES]


def bisect(passes: Callable[[float], bool], tolerance: float) -> float | None:
    """The largest scale in (0, 1] that `passes`, assuming pass/fail is monotone: 1 if it passes,
    else halve [0, 1] (0 taken as passing, never scored) until the bracket is narrower than
    `tolerance`; None when no scale scored passes. With tolerance 0.01 that is at most 8 scores,
    and every midpoint is a dyadic fraction, so the scales are exact in binary."""
    if passes(1.0):
        return 1.0
    low, high = 0.0, 1.0
    while high - low >= tolerance:
        mid = (low + high) / 2
        if passes(mid):
            low = mid
        else:
            high = mid
    return low if low > 0 else None


def describe(c: Check) -> str:
    """'retention.general.ppl.ratio = 1.31, not <= 1.2'."""
    observed = "non-finite" if c.observed is None else f"{c.observed:.4g}"
    return f"{c.metric}{'' if c.at == 'value' else f'[{c.at}]'} = {observed}, not {c.threshold}"


def _score(session: Session, policy: Policy, scale: float) -> Step:
    """The full suite at `scale` (never a light point: the gate may read any metric) and the
    policy's rules on it. The policy's `entries` do not apply: there is one candidate."""
    entry = session.entry(0, scale)
    checks = check(Results(entries=[entry]), policy, ["*"])
    missing = [c for c in checks if c.status == "missing"]
    if missing:  # the same at every scale: no search can pass it
        raise UsageError(f"{policy.source}: rule '{missing[0].rule}' reads {missing[0].metric}, which the suite "
                         f"{session.suite_path} does not measure (set `missing: skip` on it, or measure it)")
    return Step(scale, checks, entry)


def fold_scale(source: Path, target: Path, scale: float, magnitudes: dict | None = None) -> int:
    """Copy the PEFT adapter `source` into `target` with `scale` folded into its B tensors (and,
    for DoRA, its magnitudes replaced by `magnitudes`, `lora.scaled_magnitudes`), plus its config
    and tokenizer files; returns how many B tensors were scaled."""
    with safe_open(str(source / ADAPTER_FILES[1]), "pt") as f:
        metadata = f.metadata() or {"format": "pt"}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    scaled = [key for key in tensors if B_KEY.search(key)]
    if not scaled:
        raise UsageError(f"{source / ADAPTER_FILES[1]}: no LoRA B tensor to scale")
    for key in scaled:
        tensors[key] = tensors[key] * scale
    for key in [key for key in tensors if key.endswith(MAGNITUDE)]:  # DoRA: m_t, from the base's norms
        if key not in (magnitudes or {}):
            raise UsageError(f"{source / ADAPTER_FILES[1]}: {key}: a DoRA magnitude needs the base's weights to scale")
        tensors[key] = magnitudes[key].to(tensors[key].dtype)
    save_file(tensors, str(target / ADAPTER_FILES[1]), metadata=metadata)
    shutil.copy2(source / ADAPTER_FILES[0], target / ADAPTER_FILES[0])
    for pattern in TOKENIZER_FILES:
        for path in source.glob(pattern):
            if path.is_file():
                shutil.copy2(path, target / path.name)
    return len(scaled)


def _record(session: Session, policy: Policy, tolerance: float, steps: list[Step], chosen: float) -> dict:
    spec = session.specs[0]
    above = [s.scale for s in steps if not s.passed]
    header = session.results([])  # the suite and base as results.json names them
    return Calibration(
        created=header.created, adapter=str(spec.path), run=str(spec.run_dir) if spec.run_dir else None,
        name=spec.name, family=spec.family, suite=header.suite,
        base={key: header.base[key] for key in ("model", "fingerprint")},
        policy={"name": policy.name, "path": policy.source,
                "rules": [f"{r.label()} {r.threshold}" for r in policy.rules]},
        tolerance=tolerance,
        steps=[{"scale": s.scale, "passed": s.passed,
                "failing": [{"rule": c.rule, "metric": c.metric, "observed": c.observed, "status": c.status}
                            for c in s.failing]}
               for s in steps],
        chosen_scale=chosen,
        fails_at=min(above) if above else None,  # the smallest scale scored above it that fails
    ).payload()


def _no_scale_passes(policy: Policy, steps: list[Step]) -> str:
    """One line: the rules failing at the smallest scale scored, and those of them that pass at
    scale 1 (the search's assumption of monotone failures does not hold for them)."""
    smallest = min(steps, key=lambda s: s.scale)
    at_one = {(c.rule, c.metric) for c in steps[0].failing}
    line = (f"no scale passes gate {policy.name} ({policy.source}); at the smallest scale scored, "
            f"{smallest.scale:g}: {'; '.join(describe(c) for c in smallest.failing)}")
    grew = sorted({c.metric for c in smallest.failing if (c.rule, c.metric) not in at_one})
    if grew:
        verbs = ("passes", "fails") if len(grew) == 1 else ("pass", "fail")
        line += (f" ({', '.join(grew)} {verbs[0]} at scale 1 and {verbs[1]} below it: the search assumes a "
                 "failing scale fails above too, so a passing scale may lie between)")
    return line


def check_arguments(out: Path, tolerance: float) -> None:
    if not 0.0 < tolerance < 1.0:  # also refuses NaN
        raise UsageError(f"--tolerance {tolerance:g}: expected a number strictly between 0 and 1, e.g. 0.01")
    if out.exists():
        raise UsageError(f"{out}: already exists; calibrate writes a new adapter directory")


def run_calibrate(suite_path: str | Path, policy_path: str | Path, out: str | Path, run: Path | None = None,
                  adapter: Path | None = None, base: str | None = None, tolerance: float = 0.01) -> int:
    """Search, then write OUTDIR; 0 when a scale passes. No passing scale raises RunFailed (exit 1)
    and writes nothing; bad input raises UsageError (exit 2) before the model loads where it can."""
    out = Path(out)
    check_arguments(out, tolerance)
    policy = load_policy(policy_path)
    init_distributed()
    session = open_session(suite_path, [run] if run else [], [adapter] if adapter else [], base,
                           checkpoints=False)
    steps: list[Step] = []

    def passes(scale: float) -> bool:
        steps.append(_score(session, policy, scale))
        if is_main_process():
            verdict = "PASS" if steps[-1].passed else f"FAIL ({'; '.join(map(describe, steps[-1].failing))})"
            print(f"calibrate: scale {scale:g}: {verdict}", flush=True)
        return steps[-1].passed

    chosen = bisect(passes, tolerance)
    if chosen is None:
        raise RunFailed(_no_scale_passes(policy, steps))
    step = next(s for s in steps if s.scale == chosen)
    if is_main_process():
        session.evaluator.peft.set_adapter("a0")
        write_outputs(out, session.specs[0].path, chosen, session.results([step.entry]).payload(),
                      _record(session, policy, tolerance, steps, chosen),
                      scaled_magnitudes(session.evaluator.peft, chosen))
        print(f"calibrate: scale {chosen:g} passes gate {policy.name}; adapter: {out}")
    return 0


def write_outputs(out: Path, source: Path, scale: float, results: dict, record: dict,
                  magnitudes: dict | None = None) -> None:
    """The scaled adapter, results.json and calibration.json, staged in a temporary sibling of
    `out` and renamed onto it: `out` appears complete or not at all."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with writing(out, "nothing was written"), \
            tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        staged = Path(tmp) / "out"
        staged.mkdir()
        fold_scale(source, staged, scale, magnitudes)
        write_manifest(staged)  # the adapter's files, sealed as training seals its adapter
        write_json(staged / "results.json", results)
        write_json(staged / "calibration.json", record)
        staged.rename(out)
