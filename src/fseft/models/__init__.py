"""Architectures (`SegmentationModel` = `features` + 1x1x1 `head`), the model zoo, and safe
checkpoint loading. See docs/architecture.md for the contract."""

from fseft.models.base import SegmentationModel
from fseft.models.checkpoint import (
    CheckpointWarning,
    KeyRules,
    load_model_file,
    read_model_file_config,
    save_model_file,
)
from fseft.models.swin_unetr import SwinUNETRSegmenter
from fseft.models.unet import UNet3DSegmenter
from fseft.models.zoo import MODEL_SPECS, ModelSpec, create_model, load_model

__all__ = [
    "MODEL_SPECS",
    "CheckpointWarning",
    "KeyRules",
    "ModelSpec",
    "SegmentationModel",
    "SwinUNETRSegmenter",
    "UNet3DSegmenter",
    "create_model",
    "load_model",
    "load_model_file",
    "read_model_file_config",
    "save_model_file",
]
