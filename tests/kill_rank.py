"""`python -m tests.kill_rank ARGS`: `workbench ARGS`, except that the process of rank
$KILL_RANK sends itself SIGKILL at the end of step $KILL_STEP: a data-parallel rank lost mid-run."""

import os
import signal
import sys

from tests.helpers import signal_at_step
from workbench.cli import main

signal_at_step(int(os.environ["KILL_STEP"]), signal.SIGKILL, rank=os.environ["KILL_RANK"])

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
