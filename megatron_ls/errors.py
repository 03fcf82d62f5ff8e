"""Errors meant for a user: a bad input, flag, file or layout that the user can fix.

Every entry point (megatron_ls/cli/) turns a ``UserError`` into one line on stderr and a non-zero exit,
never a traceback. Anything else that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """The message is meant to be shown as is, on one line."""


class ConfigError(UserError):
    """Bad or contradictory settings: flags, a preset, the DeepSpeed JSON, a tool's options."""


class ParallelConfigError(ConfigError, ValueError):
    """A parallel layout that cannot work (raised identically on every rank)."""


class DataError(UserError):
    """A corpus, shard or tokenizer problem."""


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit what reads it."""


class InferenceError(UserError):
    """A model, prompt or option an inference tool cannot use."""


class TrainingError(UserError):
    """A run that cannot go on (a NaN loss for many steps in a row, ...)."""


def by_name(name: str) -> type[UserError]:
    """The UserError class of that name (UserError itself for an unknown one): ranks agree on errors by name."""
    found = globals().get(name)
    return found if isinstance(found, type) and issubclass(found, UserError) else UserError
