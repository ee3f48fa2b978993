"""fseft: few-shot, parameter-efficient fine-tuning of volumetric (CT) segmentation foundation models.

The Python API (`fseft.api`, docs/python_api.md)::

    import fseft

    model = fseft.load_model("phantom")                  # zoo id or model file -> Segmenter
    adapted = fseft.adapt(model, "data", "liver", k=1)   # few-shot adaptation -> Segmenter
    seg = adapted.predict("scan.nii.gz")                 # masks in the scan's geometry, in memory
    run = fseft.load_run("runs/liver_k1")                # an `fseft adapt` run folder -> Segmenter

Those names are imported on first use (module ``__getattr__``), so that ``import fseft`` and
``fseft --help`` do not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from fseft.errors import ConfigError, FseftError, InputFileError  # noqa: E402

#: the API's names, from `fseft.api`, imported when first used
_API = ("Segmentation", "Segmenter", "adapt", "load_model", "load_run")

__all__ = ["ConfigError", "FseftError", "InputFileError", "Segmentation", "Segmenter", "__version__", "adapt",
           "load_model", "load_run", "methods"]


def __getattr__(name: str) -> Any:
    # `importlib` rather than an import statement: the package imports the API lazily, and the
    # API's modules import `fseft.__version__` (tests/test_imports.py reads import statements)
    if name in _API:
        value = getattr(importlib.import_module("fseft.api"), name)
    elif name == "methods":  # fseft.methods.LoraConfig(...) after a bare `import fseft`
        value = importlib.import_module("fseft.methods")
    else:
        raise AttributeError(f"module 'fseft' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
