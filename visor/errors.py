"""The one exception family of visor: a user's mistake, said in one line with what to do."""


class VisorError(Exception):
    """Base class: the CLI prints the message (no traceback) and exits with code 2."""


class ConfigError(VisorError):
    """A schedule, budget or option that does not fit the model."""


class CheckpointError(VisorError):
    """A checkpoint directory that is missing, corrupt or inconsistent with its config."""


class InputError(VisorError):
    """An image, prompt or data record that cannot be used."""


class OutputError(VisorError):
    """An output path that can't be written without losing data, or a write that failed."""
