"""Shared fixtures. Real CT examples live in ../shared/data/totalseg-examples beside the checkout."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "totalseg-examples"


@pytest.fixture(scope="session")
def totalseg_examples() -> Path:
    """The real CT examples folder; tests that need it are skipped where it is absent."""
    if not (SHARED_DATA / "example_ct_sm.nii.gz").exists():
        pytest.skip(f"real CT examples not found at {SHARED_DATA}")
    return SHARED_DATA

