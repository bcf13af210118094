"""The ways a command stops short, mapped to exit codes by the CLI."""


class UsageError(Exception):
    """Bad usage or bad input (a recipe, a data file, a model dir): exit code 2, one line."""


class RunFailed(Exception):
    """The job ran and failed (training diverged, a gate failed): exit code 1."""


class Interrupted(Exception):
    """A run stopped by a signal after saving a checkpoint: exit 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (parsers' messages can span several), or its
    type's name when it has none: what an `error:` line quotes."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class WriteFailed(RunFailed):
    """A file could not be written (no space, no permission, its directory gone): exit 1. The
    message names the file, the cause and where the last good state is."""

    def __init__(self, path, cause: str, state: str):
        super().__init__(f"could not write {path} ({cause}); {state}")
        self.path, self.cause, self.state = path, cause, state
