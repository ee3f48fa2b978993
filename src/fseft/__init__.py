"""fseft: few-shot, parameter-efficient fine-tuning of volumetric (CT) segmentation foundation models."""

__version__ = "0.1.0"

from fseft.errors import ConfigError, FseftError, InputFileError  # noqa: E402

__all__ = ["ConfigError", "FseftError", "InputFileError", "__version__"]
