"""Errors a user can fix: shown as one line, never as a traceback, and the run exits non-zero."""


class TrainingError(Exception):
    """A problem with the run's inputs or state; the message is meant to be shown as is."""


class ConfigError(TrainingError):
    """Bad or contradictory arguments (flags, preset, DeepSpeed JSON)."""


class CheckpointError(TrainingError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit this run."""
