"""Errors fseft raises on bad input. The CLI prints their message (no traceback) and exits 2."""


class FseftError(Exception):
    """Base class: a problem with the user's input, files or configuration.

    The message names the file (or option) and the problem.
    """


class InputFileError(FseftError):
    """A file or folder that cannot be read, or whose content is not what was expected."""


class ConfigError(FseftError):
    """A configuration (CLI options, YAML file, dataclass fields) that is invalid."""
