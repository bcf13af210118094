"""The `Evaluator`: one loaded model (base weights plus named adapters) scored under a suite.

Each component (general text, each multiple-choice task, the target data) has a base side that
depends only on the base weights and goes through `BaseCache`, and a tuned side computed for
every adapter and scale. Metric names are those of the catalogue (`formats/metrics.py`);
`evaluate.py` is the command that loads the model and writes results.json.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from workbench.data.examples import data_fingerprint
from workbench.io import fingerprint
from workbench.modeling.lora import adapter_scale, as_base, unwrap_peft
from workbench.evals import metrics as M
from workbench.scoring import general
from workbench.scoring.base_cache import BaseCache, ragged, unragged
from workbench.scoring.general import nll_rows
from workbench.formats.results import items_record, metric
from workbench.scoring.scorer import Request, Scorer, choice_outcome
from workbench.evals.suite import Suite
from workbench.scoring.tokens import greedy_generate, prompt_and_reference, token_logprobs


@dataclass
class TargetData:
    """Tokenised target examples: members were trained on, heldout were not."""

    heldout: list[dict]
    members: list[dict] = field(default_factory=list)
    key: str = ""  # fingerprint of the examples, for the base cache


@dataclass
class EvalData:
    general: list[dict] | None
    multiple_choice: dict[str, list]  # task name -> MCItem list
    target: TargetData | None


@dataclass
class Subject:
    """What one results entry scores: an adapter loaded on the model, at a scale."""

    name: str
    adapter: str  # the PEFT adapter name loaded on the model
    scale: float = 1.0
    light: bool = False  # learning (target held-out loss) and general text only: a trajectory point


class Evaluator:
    """Scores one loaded PEFT model (base weights + named adapters) under a suite."""

    def __init__(self, model, tokenizer, suite: Suite, cache: BaseCache):
        self.model, self.tokenizer, self.suite, self.cache = model, tokenizer, suite, cache
        self.peft = unwrap_peft(model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.scorer = Scorer(model, tokenizer, batch_size=suite.batch_size, max_length=suite.max_length)
        self.side = "tuned"
        self.forward_calls = {"base": 0, "tuned": 0}
        self.peft.get_base_model().register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.forward_calls[self.side] += 1

    @contextlib.contextmanager
    def base(self) -> Iterator[None]:
        self.side = "base"
        try:
            with as_base(self.peft):
                yield
        finally:
            self.side = "tuned"

    @contextlib.contextmanager
    def tuned(self, entry: Subject) -> Iterator[None]:
        self.peft.set_adapter(entry.adapter)
        with adapter_scale(self.peft, entry.scale), torch.no_grad():
            yield

    # --- one entry ---------------------------------------------------------------------------

    def evaluate(self, entry: Subject, data: EvalData) -> tuple[dict, dict]:
        """(metrics, curves) for one adapter at one scale."""
        metrics, curves, _ = self.evaluate_items(entry, data)
        return metrics, curves

    def evaluate_items(self, entry: Subject, data: EvalData) -> tuple[dict, dict, dict]:
        """(metrics, curves, items) for one adapter at one scale. items: the per-item scores every
        resampled metric is recomputed from (`workbench.compare.items`; docs/results.md):
        {"general": ..., "mc": {task: ...}, "target": ...}, each with its items' fingerprint."""
        self.model.eval()
        self.items: dict = {}
        metrics: dict[str, dict] = {}
        curves: dict[str, dict] = {}
        if data.general is not None:
            metrics.update(self._general(entry, data.general))
        if data.multiple_choice and not entry.light:
            m, c = self._multiple_choice(entry, data.multiple_choice)
            metrics.update(m)
            curves.update(c)
        if data.target is not None:
            m, c = self._target(entry, data.target)
            metrics.update(m)
            curves.update(c)
        return metrics, curves, self.items

    # --- general text: perplexity, KL and agreement -------------------------------------------

    def _general(self, entry: Subject, chunks: list[dict]) -> dict:
        g = self.suite.general
        base = general.base_side(self.model, chunks, g.top_k, self.suite.batch_size, self.pad_id, self.cache,
                                 (g.model_dump(), data_fingerprint(chunks)), self.base)
        with self.tuned(entry):
            scores = general.tuned_side(self.model, chunks, base, self.suite.batch_size, self.pad_id,
                                        desc=f"{entry.name}: general text")
        self.items["general"] = items_record(
            data_fingerprint(chunks), tokens=scores.tuned_nll[:, 1], base_nll=scores.base_nll[:, 0],
            tuned_nll=scores.tuned_nll[:, 0], kl=scores.kl_low, kl_upper=scores.kl_high,
            top1_agreement=scores.agree)
        ppl = M.ratio_bootstrap_ci(scores.base_nll, scores.tuned_nll, n_boot=self.suite.bootstrap)
        out = {"retention.general.ppl.base": metric(ppl["base"]),
               "retention.general.ppl.tuned": metric(ppl["tuned"], (ppl["tuned_ci_low"], ppl["tuned_ci_high"])),
               "retention.general.ppl.ratio": metric(ppl["ratio"], (ppl["ci_low"], ppl["ci_high"]))}
        for name, values in (("kl", scores.kl_low), ("kl_upper", scores.kl_high), ("top1_agreement", scores.agree)):
            ci = M.paired_bootstrap_ci(np.zeros_like(values), values, n_boot=self.suite.bootstrap)
            out[f"retention.general.{name}"] = metric(ci["tuned"], (ci["ci_low"], ci["ci_high"]))
        return out

    # --- multiple choice: accuracy and calibration --------------------------------------------

    def _choice_logprobs(self, items: list, desc: str) -> list[np.ndarray]:
        requests = [Request(item.context, item.delimiter + choice) for item in items for choice in item.choices]
        responses = self.scorer.loglikelihood(requests, desc=desc)
        flat = np.array([r.logprob for r in responses], dtype=np.float64)
        bounds = np.cumsum([0] + [len(item.choices) for item in items])
        return [flat[bounds[i]:bounds[i + 1]] for i in range(len(items))]

    def _mc_base(self, task: str, items: list) -> dict[str, torch.Tensor]:
        with self.base():
            rows = self._choice_logprobs(items, f"base: {task}")
        return ragged([torch.from_numpy(r) for r in rows])

    def _multiple_choice(self, entry: Subject, tasks: dict[str, list]) -> tuple[dict, dict]:
        outcomes: dict[str, dict[str, list]] = {}
        for task, items in tasks.items():
            stored = self.cache.get(f"mc:{task}", (items_key(items),), lambda: self._mc_base(task, items))
            base_rows = [r.numpy() for r in unragged(stored["values"], stored["offsets"])]
            with self.tuned(entry):
                tuned_rows = self._choice_logprobs(items, f"{entry.name}: {task}")
            outcomes[task] = {side: [choice_outcome(lp, item.choices, item.gold) for lp, item in zip(rows, items)]
                              for side, rows in (("base", base_rows), ("tuned", tuned_rows))}
            self.items.setdefault("mc", {})[task] = items_record(items_key(items), **{
                f"{name}_{side}": [o[name] for o in outcomes[task][side]]
                for name in ("acc", "acc_norm") for side in ("base", "tuned")})
        if len(tasks) > 1:
            outcomes["all"] = {side: [o for t in tasks for o in outcomes[t][side]] for side in ("base", "tuned")}
        elif tasks:
            outcomes["all"] = outcomes[next(iter(tasks))]
        metrics, curves = {}, {}
        for task, sides in outcomes.items():
            metrics.update(self._mc_metrics(task, sides))
            curves[f"calibration.{task}.reliability"] = {
                side: _json_bins(M.reliability_bins([o["confidence"] for o in outs], [o["acc"] for o in outs],
                                                    self.suite.ece_bins))
                for side, outs in sides.items()}
        return metrics, curves

    def _mc_metrics(self, task: str, sides: dict[str, list]) -> dict:
        out = {}
        for name in ("acc", "acc_norm"):
            ci = M.paired_bootstrap_ci([o[name] for o in sides["base"]], [o[name] for o in sides["tuned"]],
                                       n_boot=self.suite.bootstrap)
            out.update(_paired(f"retention.mc.{task}.{name}", ci))
        per_side = {}
        for side, outs in sides.items():
            conf, correct = [o["confidence"] for o in outs], [o["acc"] for o in outs]
            per_side[side] = {
                "ece": M.ece(conf, correct, self.suite.ece_bins),
                "ece_adaptive": M.ece(conf, correct, self.suite.ece_bins, scheme="adaptive"),
                "brier": M.brier_score([o["probs"] for o in outs], [o["gold"] for o in outs])}
        for name in ("ece", "ece_adaptive", "brier"):
            b, t = per_side["base"][name], per_side["tuned"][name]
            out[f"calibration.{task}.{name}.base"] = metric(b)
            out[f"calibration.{task}.{name}.tuned"] = metric(t)
            out[f"calibration.{task}.{name}.delta"] = metric(t - b)
        return out

    # --- target: learning, overfitting, memorisation, membership --------------------------------

    def _generate(self, examples: list[dict], desc: str) -> tuple[list[list[int]], list[list[int]]]:
        """(greedy generations, references), both capped at the suite's max_new_tokens."""
        cap = self.suite.target.max_new_tokens
        pairs = [prompt_and_reference(ex) for ex in examples]
        references = [reference[:cap] for _, reference in pairs]
        generated = greedy_generate(self.model, [prompt for prompt, _ in pairs], [len(r) for r in references],
                                    self.suite.batch_size, self.pad_id, self.tokenizer.eos_token_id, desc)
        return generated, references

    def _exact_matches(self, generated: list[list[int]], references: list[list[int]]) -> np.ndarray:
        """Per example 1.0 when the generated text equals the reference text, else 0.0."""
        def text(ids):
            return self.tokenizer.decode(ids, skip_special_tokens=True)

        return np.array([M.exact_match_rate([text(g)], [text(r)]) for g, r in zip(generated, references)])

    def _target_base(self, target: TargetData) -> dict[str, torch.Tensor]:
        with self.base():
            heldout_rows = token_logprobs(self.model, target.heldout, self.suite.batch_size, self.pad_id,
                                          desc="base: target held-out")
            member_rows = token_logprobs(self.model, target.members, self.suite.batch_size, self.pad_id,
                                         desc="base: target train")
            learn = target.heldout[:self.suite.target.num_examples]
            matches = self._exact_matches(*self._generate(learn, "base: generate"))
        return {"heldout_nll": torch.from_numpy(nll_rows(heldout_rows)),
                "member_nll": torch.from_numpy(nll_rows(member_rows).reshape(-1, 2)),
                "exact_match": torch.from_numpy(matches)}

    def _target(self, entry: Subject, target: TargetData) -> tuple[dict, dict]:
        t = self.suite.target
        base = self.cache.get("target", (t.model_dump(), target.key), lambda: self._target_base(target))
        n_learn = min(t.num_examples, len(target.heldout))
        n_pairs = min(len(target.members), len(target.heldout))
        with self.tuned(entry):
            heldout = target.heldout[:n_learn] if entry.light else target.heldout
            heldout_rows = token_logprobs(self.model, heldout, self.suite.batch_size, self.pad_id,
                                          desc=f"{entry.name}: target held-out")
            tuned_nll = nll_rows(heldout_rows[:n_learn])
            self.items["target"] = items_record(data_fingerprint(target.heldout[:n_learn]), tokens=tuned_nll[:, 1],
                                                base_nll=base["heldout_nll"].numpy()[:n_learn, 0],
                                                tuned_nll=tuned_nll[:, 0])
            if entry.light:
                return self._learning(base, heldout_rows, n_learn), {}
            member_rows = token_logprobs(self.model, target.members, self.suite.batch_size, self.pad_id,
                                         desc=f"{entry.name}: target train")
            heldout_gen = self._generate(target.heldout[:max(n_learn, n_pairs)], f"{entry.name}: generate held-out")
            member_gen = self._generate(target.members[:n_pairs], f"{entry.name}: generate train")
        out = self._learning(base, heldout_rows, n_learn)
        tuned_em = self._exact_matches(heldout_gen[0][:n_learn], heldout_gen[1][:n_learn])
        self.items["target"].update(items_record(self.items["target"]["key"], exact_match_tuned=tuned_em,
                                                 exact_match_base=base["exact_match"].numpy()))
        em = M.paired_bootstrap_ci(base["exact_match"].numpy(), tuned_em, n_boot=self.suite.bootstrap)
        out.update(_paired("learning.exact_match", em))
        if n_pairs == 0:
            return out, {}
        out["overfitting.extraction.train"] = metric(M.extraction_rate(*member_gen))
        out["overfitting.extraction.heldout"] = metric(
            M.extraction_rate(heldout_gen[0][:n_pairs], heldout_gen[1][:n_pairs]))
        out["overfitting.extraction.gap"] = metric(out["overfitting.extraction.train"]["value"]
                                                   - out["overfitting.extraction.heldout"]["value"])
        return self._overfitting(out, base, heldout_rows, member_rows, n_pairs)

    def _learning(self, base: dict, heldout_rows: list[torch.Tensor], n: int) -> dict:
        """Held-out target loss of the first n examples, base and tuned, with a paired CI."""
        learn = M.ratio_bootstrap_ci(base["heldout_nll"].numpy()[:n], nll_rows(heldout_rows[:n]),
                                     n_boot=self.suite.bootstrap)
        log = math.log
        tuned_ci = (learn["tuned_ci_low"], learn["tuned_ci_high"])
        return {"learning.val_loss.base": metric(log(learn["base"])),
                "learning.val_loss.tuned": metric(log(learn["tuned"]), tuple(map(log, tuned_ci))),
                "learning.val_loss.delta": metric(log(learn["ratio"]), (log(learn["ci_low"]), log(learn["ci_high"]))),
                "learning.val_ppl.base": metric(learn["base"]),
                "learning.val_ppl.tuned": metric(learn["tuned"], tuned_ci)}

    def _overfitting(self, out: dict, base: dict, heldout_rows, member_rows, n: int) -> tuple[dict, dict]:
        """Train vs held-out loss gap, and membership inference on n members vs n non-members."""
        train_nll, val_nll = nll_rows(member_rows), nll_rows(heldout_rows)
        train_loss = train_nll[:, 0].sum() / train_nll[:, 1].sum()
        out["overfitting.train_loss.tuned"] = metric(train_loss)
        out["overfitting.loss_gap"] = metric(val_nll[:, 0].sum() / val_nll[:, 1].sum() - train_loss)

        def scores(rows, base_nll):
            loss = np.array([-float(r.mean()) for r in rows])
            base_loss = base_nll[:, 0] / base_nll[:, 1]
            return M.membership_scores(loss, base_loss, [r.numpy() for r in rows], k=self.suite.overfitting.min_k)

        pos = scores(member_rows[:n], base["member_nll"].numpy()[:n])
        neg = scores(heldout_rows[:n], base["heldout_nll"].numpy()[:n])
        curves = {}
        for name in pos:
            out[f"overfitting.mia.{name}.auc"] = metric(M.roc_auc(pos[name], neg[name]))
            out[f"overfitting.mia.{name}.tpr_at_1pct_fpr"] = metric(M.tpr_at_fpr(pos[name], neg[name], 0.01))
            fpr, tpr = M.roc_curve(pos[name], neg[name])
            curves[f"overfitting.mia.{name}.roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
        return out, curves


# --- helpers ---------------------------------------------------------------------------------


def _paired(prefix: str, ci: dict) -> dict:
    return {f"{prefix}.base": metric(ci["base"]), f"{prefix}.tuned": metric(ci["tuned"]),
            f"{prefix}.delta": metric(ci["delta"], (ci["ci_low"], ci["ci_high"]))}


def _json_bins(bins: list[dict]) -> list[dict]:
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in b.items()} for b in bins]


def items_key(items: list) -> str:
    return fingerprint([[i.context, list(i.choices), i.gold, i.delimiter] for i in items])
