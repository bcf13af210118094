"""One difference measured in several cells, pooled: the DerSimonian-Laird random-effects estimate.

A cell of the study is one model fine-tuned on one kind of task, compared with `workbench
compare`; its matched-learning difference d_i (family - reference, in the forgetting metric's
units) has a standard error se_i. Why random effects: the cells differ in model and task, so a
regularizer's effect is not one number measured k times with noise but a spread of true effects,
one per cell (KL to the base may save more on a 135M instruct model than on a 270M pretrained
base). A fixed-effect (inverse-variance) mean would treat the cells' disagreement as sampling
noise and give a CI far narrower than the evidence: two cells at -0.10 and +0.10, each with se
0.01, pool to 0 -+ 0.014 (95%) under fixed effects, 0 -+ 0.196 under random effects. The
random-effects mean estimates the average effect over cells like these, and its CI widens by the
between-cell variance tau^2.

Pure maths over floats, no I/O; workbench.compare.summarize reads the cells and prints the table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from workbench.compare.frontier import Z95


@dataclass(frozen=True)
class Pooled:
    """The random-effects estimate over k cells, in the metric's units."""

    value: float         # mu: the weighted mean with w_i = 1 / (se_i^2 + tau^2)
    se: float            # 1 / sqrt(sum w_i)
    lo: float            # mu - 1.96 se
    hi: float            # mu + 1.96 se
    tau2: float          # the between-cell variance of the true effects (0: the cells agree)
    i2: float | None     # the share of the spread beyond chance, 0..1; None with one cell
    q: float             # Cochran's Q about the fixed-effect mean, k - 1 degrees of freedom
    k: int               # the cells pooled


def dersimonian_laird(values: Sequence[float], ses: Sequence[float], z: float = Z95) -> Pooled:
    """Pool k differences d_i with standard errors se_i > 0 (DerSimonian & Laird, 1986).

        fixed-effect weights   v_i = 1 / se_i^2,  m = sum v_i d_i / sum v_i
        heterogeneity          Q = sum v_i (d_i - m)^2                  (k - 1 df under no spread)
        between-cell variance  tau^2 = max(0, (Q - (k - 1)) / (sum v - sum v^2 / sum v))
        random-effects weights w_i = 1 / (se_i^2 + tau^2)
        estimate               mu = sum w_i d_i / sum w_i,  se(mu) = 1 / sqrt(sum w_i)
        95% CI                 mu -+ 1.96 se(mu)
        I^2                    max(0, (Q - (k - 1)) / Q)   (0 when Q = 0; None when k = 1)

    tau^2 is the method-of-moments estimate: Q's expectation is (k - 1) + tau^2 (sum v - sum v^2 /
    sum v), solved for tau^2 and clipped at 0. When the cells agree within their noise (Q <= k - 1)
    tau^2 = 0 and mu is the fixed-effect mean with se 1 / sqrt(sum v). One cell pools to itself.

    What it costs: with few cells tau^2 rests on Q's k - 1 degrees of freedom (one, with two
    cells), and the normal CI ignores that tau^2 is estimated, so with 2 to 6 cells the CI is
    narrower than its nominal 95% when the cells really differ (Hartung-Knapp's t_{k-1} CI is the
    usual widening). The table prints k and I^2 beside every pooled verdict for that reason.
    se_i is read as a normal se (a percentile bootstrap CI's skew is not carried)."""
    k = len(values)
    if k == 0 or k != len(ses):
        raise ValueError(f"dersimonian_laird: {k} values and {len(ses)} standard errors; give one or more of each")
    if not all(math.isfinite(d) for d in values) or not all(math.isfinite(s) and s > 0 for s in ses):
        raise ValueError("dersimonian_laird: every value finite and every se finite and above 0 "
                         "(an se of 0 would take all the weight)")
    v = [1.0 / (s * s) for s in ses]
    sv = sum(v)
    m = sum(vi * d for vi, d in zip(v, values)) / sv
    q = sum(vi * (d - m) ** 2 for vi, d in zip(v, values))
    c = sv - sum(vi * vi for vi in v) / sv  # 0 only when k = 1
    tau2 = max(0.0, (q - (k - 1)) / c) if k > 1 else 0.0
    w = [1.0 / (s * s + tau2) for s in ses]
    sw = sum(w)
    mu = sum(wi * d for wi, d in zip(w, values)) / sw
    se = 1.0 / math.sqrt(sw)
    i2 = None if k == 1 else (max(0.0, (q - (k - 1)) / q) if q > 0 else 0.0)
    return Pooled(mu, se, mu - z * se, mu + z * se, tau2, i2, q, k)
