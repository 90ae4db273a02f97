"""Errors a user can act on.

Library code raises these for bad input (missing folders, unreadable configs, impossible settings);
the CLI turns them into a one-line message on stderr and a non-zero exit instead of a traceback.
"""


class PneumoniaError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class DataError(PneumoniaError):
    """The dataset is missing, empty or laid out in a way we cannot read."""


class ConfigError(PneumoniaError):
    """A configuration file or flag has an unknown key or a bad value."""


class CheckpointError(PneumoniaError):
    """A checkpoint is missing, corrupt or incompatible with this version."""


class Interrupted(PneumoniaError):
    """A run or sweep stopped by the user (Ctrl-C, SIGTERM) before it finished; it can be resumed."""

    exit_code = 130


class OutputError(PneumoniaError):
    """An output folder or file (a dataset, a report, a registry, run storage) cannot be created or written."""
