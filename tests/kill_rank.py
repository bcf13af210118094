"""`python -m tests.kill_rank ARGS`: `workbench ARGS`, except that the process of rank
$KILL_RANK sends itself SIGKILL at the end of step $KILL_STEP: a data-parallel rank lost mid-run."""

import os
import signal
import sys

from transformers import TrainerCallback

import workbench.training.run as run
from workbench.cli import main


class KillAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(os.environ["KILL_STEP"]) and os.environ.get("RANK") == os.environ["KILL_RANK"]:
            os.kill(os.getpid(), signal.SIGKILL)


_build = run.build_trainer


def _with_kill(*args, **kwargs):
    trainer, record = _build(*args, **kwargs)
    trainer.add_callback(KillAt())
    return trainer, record


run.build_trainer = _with_kill

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
