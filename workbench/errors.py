"""The two ways a command fails, mapped to exit codes by the CLI."""


class UsageError(Exception):
    """Bad usage or bad input (a recipe, a data file, a model dir): exit code 2, one line."""


class RunFailed(Exception):
    """The job ran and failed (training diverged, a gate failed): exit code 1."""
