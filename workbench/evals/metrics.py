"""Pure metrics behind the retention and overfitting evals: numpy in, floats and dicts out.

- Membership inference (did the tuned model memorize its training set?): `roc_auc`, `roc_curve`,
  `tpr_at_fpr` over per-example scores from `membership_scores`, where higher = more likely a
  member (seen in training) and the negatives are held-out examples of the same distribution.
- Calibration: `ece`, `reliability_bins`, `brier_score`.
- Generation: `exact_match_rate`, `extraction_rate` (verbatim regurgitation of training suffixes).
- Base vs tuned on the same items: `paired_bootstrap_ci` (any unary statistic) and
  `ratio_bootstrap_ci` (perplexity ratio over documents).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

ECE_SCHEMES = ("equal_width", "adaptive")


def _scores(values, name: str) -> np.ndarray:
    """A non-empty 1-D float64 array without NaN (NaN has no place in a ranking)."""
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if np.isnan(array).any():
        raise ValueError(f"{name} contains NaN")
    return array


# --- membership inference ------------------------------------------------------------------


def roc_auc(scores_pos, scores_neg) -> float:
    """P(s_pos > s_neg) + 0.5 P(s_pos == s_neg) over all (positive, negative) pairs: the
    Mann-Whitney U statistic over n_pos * n_neg, exact with ties. scores_*: [n_pos], [n_neg]."""
    pos, neg = _scores(scores_pos, "scores_pos"), np.sort(_scores(scores_neg, "scores_neg"))
    below = np.searchsorted(neg, pos, side="left")  # negatives strictly below each positive
    tied = np.searchsorted(neg, pos, side="right") - below
    return float((below.sum() + 0.5 * tied.sum()) / (pos.size * neg.size))


def roc_curve(scores_pos, scores_neg) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr), each [n_distinct_scores + 1], from (0, 0) to (1, 1).

    One point per distinct score t, in decreasing t, for the rule "member iff score >= t"; tied
    scores enter together, so a tie between the classes is a diagonal step (half credit under
    the trapezoid, which is then exactly `roc_auc`).
    """
    pos, neg = np.sort(_scores(scores_pos, "scores_pos")), np.sort(_scores(scores_neg, "scores_neg"))
    thresholds = np.unique(np.concatenate([pos, neg]))[::-1]
    # Rates as count / total (a single correctly rounded division), so a float max_fpr such as
    # 0.01 compares exactly with 1 of 100 negatives in `tpr_at_fpr`.
    tp = pos.size - np.searchsorted(pos, thresholds, side="left")
    fp = neg.size - np.searchsorted(neg, thresholds, side="left")
    fpr = np.concatenate([[0.0], fp / neg.size])
    tpr = np.concatenate([[0.0], tp / pos.size])
    return fpr, tpr


def tpr_at_fpr(scores_pos, scores_neg, max_fpr: float = 0.01) -> float:
    """Largest TPR among the ROC points with FPR <= max_fpr: exact, no interpolation between
    points. (0, 0) is always a point, so the answer is 0 when no threshold qualifies."""
    if not 0.0 <= max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in [0, 1], got {max_fpr}")
    fpr, tpr = roc_curve(scores_pos, scores_neg)
    return float(tpr[fpr <= max_fpr].max())


def min_k_prob(token_logprobs, k: float = 0.2) -> float:
    """Min-K% Prob (Shi et al. 2023) of one sequence: the mean of its lowest ceil(k * n) token
    log-probs, at least one. token_logprobs: [n]. Higher = more likely a member: training text
    has fewer very surprising tokens."""
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k}")
    logprobs = _scores(token_logprobs, "token_logprobs")
    # round first: 0.07 * 100 is 7.000000000000001 in floats, and its ceil would take 8 tokens
    count = max(1, math.ceil(round(k * logprobs.size, 9)))
    return float(np.sort(logprobs)[:count].mean())


def membership_scores(loss, base_loss=None, token_logprobs: Sequence | None = None,
                      k: float = 0.2) -> dict[str, np.ndarray]:
    """Per-example membership scores, each [n] with higher = more likely a member.

    loss: [n] each example's mean token NLL under the tuned model -> "loss": -loss.
    base_loss: [n] the same under the base model -> "loss_ratio": -(loss / base_loss), which
    discounts examples that are easy for any model (the base has not seen the training set).
    token_logprobs: n arrays [len_i] of the tuned model's token log-probs -> "min_k".
    Only the scores whose inputs are given are returned.
    """
    loss = _scores(loss, "loss")
    scores = {"loss": -loss}
    if base_loss is not None:
        base_loss = _scores(base_loss, "base_loss")
        if base_loss.shape != loss.shape:
            raise ValueError(f"base_loss has shape {base_loss.shape}, loss {loss.shape}")
        if (base_loss <= 0).any():
            raise ValueError("base_loss must be positive for a loss ratio")
        scores["loss_ratio"] = -(loss / base_loss)
    if token_logprobs is not None:
        if len(token_logprobs) != loss.size:
            raise ValueError(f"{len(token_logprobs)} token_logprobs sequences for {loss.size} losses")
        scores["min_k"] = np.array([min_k_prob(seq, k) for seq in token_logprobs])
    return scores


# --- calibration ---------------------------------------------------------------------------


def reliability_bins(confidences, correct, n_bins: int = 15,
                     scheme: str = "equal_width") -> list[dict]:
    """The n_bins bins of a reliability diagram: dicts with lo, hi, count, accuracy, confidence.

    confidences: [n] in [0, 1]; correct: [n] bool or 0/1.
    - "equal_width": [0, 1/n_bins), [1/n_bins, 2/n_bins), ..., the last closed at 1.0; lo/hi
      are the edges.
    - "adaptive" (equal mass): the examples sorted by confidence (stably) and split into n_bins
      groups as equal in size as possible (np.array_split), so tied confidences may straddle
      two groups; lo/hi are the smallest and largest confidence in the group.
    An empty bin has count 0 and NaN accuracy and confidence (and NaN lo/hi when adaptive).
    """
    conf = _scores(confidences, "confidences")
    hits = np.asarray(correct, dtype=np.float64).reshape(-1)
    if hits.shape != conf.shape:
        raise ValueError(f"correct has shape {hits.shape}, confidences {conf.shape}")
    if ((conf < 0) | (conf > 1)).any():
        raise ValueError("confidences must lie in [0, 1]")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if scheme == "equal_width":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        # searchsorted on the edges themselves (not floor(conf * n_bins), which puts 1/49 in
        # bin 0 after rounding) so a confidence on an edge lands in the bin it opens
        index = np.minimum(np.searchsorted(edges, conf, side="right") - 1, n_bins - 1)
        groups = [np.flatnonzero(index == b) for b in range(n_bins)]
        bounds = [(edges[b], edges[b + 1]) for b in range(n_bins)]
    elif scheme == "adaptive":
        groups = np.array_split(np.argsort(conf, kind="stable"), n_bins)
        bounds = [(conf[g].min(), conf[g].max()) if g.size else (np.nan, np.nan) for g in groups]
    else:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {ECE_SCHEMES}")
    return [{"lo": float(lo), "hi": float(hi), "count": int(g.size),
             "accuracy": float(hits[g].mean()) if g.size else math.nan,
             "confidence": float(conf[g].mean()) if g.size else math.nan}
            for g, (lo, hi) in zip(groups, bounds)]


def ece(confidences, correct, n_bins: int = 15, scheme: str = "equal_width") -> float:
    """Expected calibration error: sum over bins b of |B_b| / n * |acc(B_b) - conf(B_b)|, with
    the bins of `reliability_bins`; empty bins contribute 0."""
    bins = reliability_bins(confidences, correct, n_bins, scheme)
    n = sum(b["count"] for b in bins)
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"])
                     for b in bins if b["count"]))


def brier_score(probs: Sequence, label) -> float:
    """Multi-class Brier score: the mean over examples of sum_c (p_c - 1[c == label])**2.

    probs: n arrays [n_choices_i] (ragged: multiple-choice questions differ in their number of
    choices), each a distribution; label: [n] int, the index of the correct choice.
    """
    label = np.asarray(label).reshape(-1)
    if len(probs) == 0:
        raise ValueError("probs is empty")
    if len(probs) != label.size:
        raise ValueError(f"{len(probs)} probability vectors for {label.size} labels")
    total = 0.0
    for p, y in zip(probs, label):
        p = np.asarray(p, dtype=np.float64).reshape(-1)
        if not 0 <= y < p.size:
            raise ValueError(f"label {y} out of range for {p.size} choices")
        if not math.isclose(p.sum(), 1.0, abs_tol=1e-4):  # logits passed by mistake, say
            raise ValueError(f"probabilities sum to {p.sum()}, not 1")
        target = np.zeros_like(p)
        target[y] = 1.0
        total += float(((p - target) ** 2).sum())
    return total / len(probs)


# --- generation ----------------------------------------------------------------------------


def exact_match_rate(predictions: Sequence[str], references: Sequence[str],
                     normalize: bool = True) -> float:
    """Fraction of predictions equal to their reference after stripping surrounding whitespace,
    and case-folding both when `normalize`."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if len(predictions) == 0:
        raise ValueError("no predictions")

    def clean(text: str) -> str:
        return text.strip().casefold() if normalize else text.strip()

    return sum(clean(p) == clean(r) for p, r in zip(predictions, references)) / len(predictions)


def _starts_with(generated, suffix) -> bool:
    if isinstance(generated, str):
        return generated.startswith(suffix)
    return list(generated[:len(suffix)]) == list(suffix)  # token ids: list, tuple or array


def extraction_rate(generated_suffixes: Sequence, true_suffixes: Sequence) -> float:
    """Greedy extraction rate: the fraction of training examples whose generated continuation
    of the prefix begins with the exact true suffix (anything generated after it is ignored).
    Items are strings, or token-id sequences for token-level extraction."""
    if len(generated_suffixes) != len(true_suffixes):
        raise ValueError(f"{len(generated_suffixes)} generations for {len(true_suffixes)} suffixes")
    if len(true_suffixes) == 0:
        raise ValueError("no suffixes")
    if any(len(s) == 0 for s in true_suffixes):
        raise ValueError("an empty true suffix is extracted by every generation")
    hits = sum(_starts_with(g, s) for g, s in zip(generated_suffixes, true_suffixes))
    return hits / len(true_suffixes)


# --- base vs tuned -------------------------------------------------------------------------


def _resamples(n: int, n_boot: int, alpha: float, seed: int):
    """n_boot index vectors [n] drawn with replacement; the same ones for a given seed."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):  # one draw at a time: [n_boot, n] at once is large for big evals
        yield rng.integers(0, n, size=n)


def _interval(draws: list[float], alpha: float) -> tuple[float, float]:
    low, high = np.percentile(np.asarray(draws), [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def paired_bootstrap_ci(base, tuned, stat: Callable[[np.ndarray], float] = np.mean,
                        n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> dict:
    """Percentile bootstrap CI of stat(tuned) - stat(base) over paired items.

    base, tuned: [n] per-item values for the same items (e.g. 0/1 correctness). Each resample
    draws item indices with replacement and applies the same indices to both, so the
    item-to-item variance shared by the two models cancels. Returns base, tuned, delta (point
    estimates on all items), ci_low and ci_high (the alpha/2 and 1 - alpha/2 percentiles of the
    resampled deltas) and n.
    """
    base, tuned = _scores(base, "base"), _scores(tuned, "tuned")
    if base.shape != tuned.shape:
        raise ValueError(f"base has shape {base.shape}, tuned {tuned.shape}: items must be paired")
    deltas = [float(stat(tuned[idx])) - float(stat(base[idx]))
              for idx in _resamples(base.size, n_boot, alpha, seed)]
    low, high = _interval(deltas, alpha)
    b, t = float(stat(base)), float(stat(tuned))
    return {"base": b, "tuned": t, "delta": t - b, "ci_low": low, "ci_high": high, "n": base.size}


def ratio_bootstrap_ci(base, tuned, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> dict:
    """Percentile bootstrap CI of the perplexity ratio ppl_tuned / ppl_base over documents.

    base, tuned: [n, 2], one (summed token NLL, token count) row per document, the same
    documents in the same order. ppl = exp(sum nll / sum tokens) pools tokens (a mean of
    per-document perplexities would overweight short documents). Documents are resampled with
    the same indices for both. Returns base, tuned (perplexities), ratio, ci_low, ci_high (of
    the ratio), tuned_ci_low, tuned_ci_high (of the tuned perplexity alone), n.
    """
    base, tuned = np.asarray(base, dtype=np.float64), np.asarray(tuned, dtype=np.float64)
    if base.ndim != 2 or base.shape[1] != 2 or base.shape[0] == 0 or base.shape != tuned.shape:
        raise ValueError(f"base and tuned must both be [n, 2] with n >= 1; "
                         f"got {base.shape}, {tuned.shape}")
    if np.isnan(base).any() or np.isnan(tuned).any():
        raise ValueError("base or tuned contains NaN")
    if (base[:, 1] < 1).any() or (tuned[:, 1] < 1).any():  # else a resample may hold no tokens
        raise ValueError("every document needs at least one token")
    columns = np.concatenate([base, tuned], axis=1)  # [n, 4]: nll_b, tok_b, nll_t, tok_t

    def log_ratio(sums: np.ndarray) -> float:
        # difference of mean NLLs, exponentiated once: exp(0) is exactly 1 for identical inputs
        return sums[2] / sums[3] - sums[0] / sums[1]

    ratios, tuned_ppls = [], []
    for idx in _resamples(len(columns), n_boot, alpha, seed):
        resampled = columns[idx].sum(axis=0)
        ratios.append(math.exp(log_ratio(resampled)))
        tuned_ppls.append(math.exp(resampled[2] / resampled[3]))
    sums = columns.sum(axis=0)
    low, high = _interval(ratios, alpha)
    tuned_low, tuned_high = _interval(tuned_ppls, alpha)
    return {"base": math.exp(sums[0] / sums[1]), "tuned": math.exp(sums[2] / sums[3]),
            "ratio": math.exp(log_ratio(sums)), "ci_low": low, "ci_high": high,
            "tuned_ci_low": tuned_low, "tuned_ci_high": tuned_high, "n": len(columns)}
