"""User-facing errors: a mistake in a config, a dataset or a checkpoint.

Scripts catch UserError and print its message as one line (see util.cli.run_main); anything else
is a bug and keeps its traceback. Messages name the culprit (file, line, key) and what was expected.
"""


class UserError(Exception):
    """A problem the user can fix: bad config, bad data, bad checkpoint, bad path."""


class ConfigError(UserError):
    """Unknown key, wrong type or inconsistent values in a YAML config or an override."""


class DataError(UserError):
    """A list file, image or label that cannot be used as it is."""


class CheckpointError(UserError):
    """A weight or checkpoint file that is missing, unsafe or does not fit the model."""


class RunStopped(Exception):
    """A run that stopped on request (a signal) after saving where it was: not a failure. The
    message says where it stopped and how to continue; `status` is the exit status to end with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
