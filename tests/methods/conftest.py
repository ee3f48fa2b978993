"""Tiny base models shared by the method tests (two classes, random weights, eval mode)."""

import pytest
import torch
from torch import nn

from fseft.models.zoo import create_model

TINY_SWIN = dict(feature_size=12, depths=(1, 1, 1, 1))


@pytest.fixture(scope="module")
def swin_base() -> nn.Module:
    torch.manual_seed(0)
    return create_model("swin_unetr", ["liver", "spleen"], **TINY_SWIN).eval()


@pytest.fixture(scope="module")
def unet_base() -> nn.Module:
    torch.manual_seed(0)
    return create_model("unet3d", ["liver", "spleen"], base_channels=4).eval()
