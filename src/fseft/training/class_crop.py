"""Class-balanced patch centres (nnU-Net's per-class foreground oversampling) as a MONAI dict
transform. Its own module so that `fseft.training.sampling` imports without MONAI, which takes
seconds to load."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monai.transforms import RandCropByLabelClassesd


class ClassBalancedCropd(RandCropByLabelClassesd):
    """`RandCropByLabelClassesd` over a background-first label whose ratios are set per volume:
    background gets `neg`, the structures present in the volume share `pos` equally."""

    def __init__(self, keys: Sequence[str], label_key: str, spatial_size: Sequence[int], pos: float, neg: float,
                 num_samples: int) -> None:
        super().__init__(keys=list(keys), label_key=label_key, spatial_size=tuple(spatial_size), ratios=None,
                         num_samples=num_samples, warn=False)
        self.pos, self.neg = float(pos), float(neg)

    def __call__(self, data: Any, lazy: bool | None = None) -> Any:  # noqa: D102
        label = data[self.label_key]
        present = label.reshape(label.shape[0], -1).amax(dim=1)[1:] > 0
        n = int(present.sum())
        ratios = [self.neg] + [self.pos / max(n, 1) if bool(p) else 0.0 for p in present]
        if sum(ratios) == 0:  # no structure in this volume and neg = 0: centre anywhere
            ratios[0] = 1.0
        self.cropper.ratios = ratios
        return super().__call__(data, lazy)
