"""`workbench train | fisher | eval | gate | calibrate | compare | summarize | report | sweep | recipes`: exit 0 on success, 1 when a job fails, 2 on bad input.

The package: `commands` holds one function a command, `parser` the argument parser; this module
is the entry point, which maps each way a command stops short to its one line and exit code."""

from __future__ import annotations

import os
import sys
import traceback

from workbench.cli.parser import build_parser
from workbench.distributed import shutdown_distributed
from workbench.errors import Interrupted, RunFailed, UsageError, first_line


def _quiet_libraries() -> None:
    """Keep the terminal for our own progress: no telemetry, no per-import advisories. Set
    through the environment, which the libraries read when (and only if) a command imports them."""
    import logging
    import warnings

    # bitsandbytes looks for an optional CPU kernel through the `kernels` package, which logs a
    # warning about the hub's trust check on every import when the hub is offline
    for name in ("kernels", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices inside libraries


def _close_progress_bars() -> None:
    """Close every progress bar still open (innermost first), so that a line printed after an
    error starts a line of its own: a bar left open by an exception ends without a newline, and
    the error would be glued to it in a log file (`...it/s][Afailed: ...`)."""
    std = sys.modules.get("tqdm.std")  # only when a command drew bars: tqdm is never imported for this
    if std is None:
        return
    for bar in sorted(list(std.tqdm._instances), key=lambda b: -(getattr(b, "pos", 0) or 0)):
        bar.leave = True  # end the bar's line with a newline rather than erase it in place
        bar.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may follow options (`train R --output-dir D a.b=1`), which argparse won't intermix
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    _quiet_libraries()
    try:
        code = args.func(args)
        shutdown_distributed()
        return code
    except BaseException as exc:
        _close_progress_bars()
        code = _stopped_short(exc, args.debug)
        if code is None:
            raise
        return code


def _stopped_short(exc: BaseException, debug: bool) -> int | None:
    """Print the one line a command ends with when it stops short; its exit code (None: not ours
    to handle, such as SystemExit)."""
    if debug and not isinstance(exc, (Interrupted, KeyboardInterrupt)):
        traceback.print_exception(exc)
    if isinstance(exc, UsageError):
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if isinstance(exc, RunFailed):
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    if isinstance(exc, Interrupted):
        print(f"interrupted: {exc}", file=sys.stderr)
        return 128 + exc.signum
    if isinstance(exc, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    if isinstance(exc, Exception):  # a fault the workbench does not know: one line, the traceback on request
        print(f"failed: unexpected {type(exc).__name__}: {first_line(exc)} (run again with --debug for the "
              "traceback)", file=sys.stderr)
        return 1
    return None

