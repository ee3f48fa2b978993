"""Errors fseft raises on bad input. The CLI prints their message (no traceback) and exits 2."""


class FseftError(Exception):
    """Base class: a problem with the user's input, files or configuration.

    The message names the file (or option) and the problem.
    """


class InputFileError(FseftError):
    """A file or folder that cannot be read, or whose content is not what was expected."""


class ConfigError(FseftError):
    """A configuration (CLI options, YAML file, dataclass fields) that is invalid."""


class TrainingDivergedError(FseftError):
    """Training produced a non-finite loss or non-finite weights (e.g. too large a learning
    rate): the run stops and saves nothing."""
