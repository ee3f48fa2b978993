"""Shared fixtures. Real CT examples live in ../shared/data/totalseg-examples beside the checkout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fseft.models.zoo import create_model

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "totalseg-examples"


@pytest.fixture(scope="session")
def totalseg_examples() -> Path:
    """The real CT examples folder; tests that need it are skipped where it is absent."""
    if not (SHARED_DATA / "example_ct_sm.nii.gz").exists():
        pytest.skip(f"real CT examples not found at {SHARED_DATA}")
    return SHARED_DATA


# Tiny base models shared by the method and run-format tests (two classes, random weights, eval mode).
TINY_SWIN = dict(feature_size=12, depths=(1, 1, 1, 1))


@pytest.fixture(scope="module")
def swin_base() -> nn.Module:
    torch.manual_seed(0)
    return create_model("swin_unetr", ["liver", "spleen"], **TINY_SWIN).eval()


@pytest.fixture(scope="module")
def unet_base() -> nn.Module:
    torch.manual_seed(0)
    return create_model("unet3d", ["liver", "spleen"], base_channels=4).eval()
