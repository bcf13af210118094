"""`python -m tests.mutants ARGS`: the workbench CLI with one deliberate bug in RegularizedTrainer,
chosen by $WORKBENCH_MUTANT, so that the equivalence tests can show their tolerance catches it in
runs that happen in other processes (`accelerate launch`). Exists only in tests.

  per_micro_batch  per-token penalties scaled like parameter penalties (1 / accumulation steps):
                   a mean per micro-batch and per rank, not renormalised by the label tokens of
                   the whole all-rank batch (the normalisation before token_scale).
  rank_local_log   log() without the mean over ranks: rank 0 logs its own terms only.
  ungathered       parameter penalties read the LoRA factors as ZeRO-3 leaves them between
                   forwards (partitioned), not gathered.
"""

import contextlib
import os
import sys

from workbench.training import trainer as trainer_module
from workbench.training.trainer import RegularizedTrainer

SCALES = RegularizedTrainer._scales  # the correct one


def per_micro_batch(trainer, batch, num_items_in_batch):
    """_scales with token_scale replaced by step_scale."""
    _, step_scale = SCALES(trainer, batch, num_items_in_batch)
    return step_scale, step_scale


def rank_local_log(trainer, values):
    """_mean_over_ranks that does not reduce."""
    return values


def ungathered(params):
    """distributed.gathered that gathers nothing."""
    return contextlib.nullcontext()


MUTANTS = {"per_micro_batch": (RegularizedTrainer, "_scales", per_micro_batch),
           "rank_local_log": (RegularizedTrainer, "_mean_over_ranks", rank_local_log),
           "ungathered": (trainer_module, "gathered", ungathered)}


def mutate(name: str) -> None:
    """Swap the named mutant's function (a RegularizedTrainer method, or one the trainer module
    calls) for it, in this process."""
    owner, attribute, mutant = MUTANTS[name]
    setattr(owner, attribute, mutant)


if __name__ == "__main__":
    mutate(os.environ["WORKBENCH_MUTANT"])
    from workbench.cli import main

    sys.exit(main())
