import re

import pytest

from tests.helpers import REPO
from workbench.formats import metrics


@pytest.mark.parametrize("name, better", [
    ("learning.val_loss.delta", False), ("learning.exact_match.tuned", True),
    ("retention.general.ppl.ratio", False), ("retention.general.kl_upper", False),
    ("retention.mc.movie_recommendation.acc_norm.delta", True), ("retention.mc.all.acc.base", True),
    ("overfitting.mia.loss_ratio.auc", False), ("overfitting.extraction.train", None),
    ("calibration.arithmetic/1_digit_addition.ece_adaptive.delta", False),
])
def test_each_family_knows_its_direction(name, better):
    assert metrics.higher_is_better(name) is better


@pytest.mark.parametrize("name", ["retention.general.ppl.delta", "overfitting.mia.gzip.auc", "learning.val_ppl.delta",
                                  "retention.mc.all.acc", "eval_loss", "retention.mc.a.b.acc.delta"])
def test_names_outside_the_catalogue_are_refused(name):
    assert not metrics.is_metric(name)
    with pytest.raises(KeyError):
        metrics.higher_is_better(name)


def test_examples_cover_every_family_and_every_score():
    names = metrics.examples()
    assert len(names) == len(set(names))
    assert all(metrics.is_metric(n) for n in names)
    assert {"overfitting.mia.loss.auc", "overfitting.mia.min_k.auc", "overfitting.mia.loss_ratio.auc"} <= set(names)
    assert len(names) == len(metrics.CATALOGUE) + 2 * sum("<score>" in f.pattern for f in metrics.CATALOGUE)


def test_wandb_keys_group_by_section():
    assert metrics.wandb_key("retention.general.ppl.ratio") == "retention/general/ppl/ratio"
    assert metrics.wandb_key("overfitting.loss_gap") == "overfit/loss_gap"


def test_docs_table_is_the_catalogue():
    """docs/results.md carries the table made from the catalogue, so the two cannot drift."""
    doc = (REPO / "docs" / "results.md").read_text()
    assert metrics.markdown_table() in doc
    documented = re.findall(r"^\| `((?:learning|retention|overfitting|calibration)\.[^`]+)` \|", doc, re.M)
    assert len(documented) == metrics.markdown_table().count("\n| `")  # no stale row outside the table
