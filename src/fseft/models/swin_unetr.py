"""Swin-UNETR (Hatamizadeh et al., 2022) built from `monai.networks.nets.SwinUNETR`.

The MONAI sub-module names are kept (``swinViT``, ``encoder1..4``, ``encoder10``,
``decoder1..5``) so public checkpoints map with simple key rules; MONAI's ``out`` block
becomes the plain 1x1x1 `head` (key ``out.conv.conv.*`` -> ``head.*``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import PatchMerging, WindowAttention

from fseft.errors import ConfigError
from fseft.models.base import ModelParts, SegmentationModel, check_divisible


class LegacyPatchMerging(PatchMerging):
    """MONAI 0.9-1.4's 3D patch merging, the one every public Swin-UNETR checkpoint was trained
    with (MONAI's BTCV and self-supervised models, and the copies of MONAI's code in the
    CLIP-Driven, SuPreM and FSEFT repositories).

    It concatenates the ``(d, h, w)`` offsets ``000, 100, 010, 001, 101, 010, 001, 111`` of each
    2x2x2 block: ``010`` and ``001`` twice, ``110`` and ``011`` never. MONAI 1.5 (PR #8285)
    concatenates the eight distinct offsets instead; with the same weights the two compute
    different features, so a checkpoint must run with the order it was trained with.
    """

    #: (d, h, w) offsets in concatenation order
    offsets = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, D, H, W, C)`` -> ``(B, ceil(D/2), ceil(H/2), ceil(W/2), 2C)``."""
        if x.ndim != 5:
            return super().forward(x)
        _, d, h, w, _ = x.shape
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in self.offsets], -1)
        return self.reduction(self.norm(x))


#: ``patch_merging`` option -> MONAI ``downsample`` block: ``"legacy"`` = MONAI 0.9-1.4 (the
#: public checkpoints), ``"current"`` = MONAI >= 1.5 (fseft's own models, e.g. the embedded one).
PATCH_MERGING: dict[str, type[PatchMerging]] = {"legacy": LegacyPatchMerging, "current": PatchMerging}


class SwinUNETRSegmenter(SegmentationModel):
    """Swin-UNETR whose `features` is the ``decoder1`` output (``feature_size`` channels).

    Args:
        class_names: one output channel per structure.
        feature_size: 48 for the public checkpoints; 12 or 24 for tests and small models.
        depths, num_heads: Swin stages (MONAI defaults, those of all public checkpoints).
        use_checkpoint: gradient checkpointing in the Swin blocks (less memory, slower).
        use_v2: Swin-UNETR v2 (extra residual conv blocks per stage).
        patch_merging: ``"legacy"`` (MONAI 0.9-1.4's sub-grid order, `LegacyPatchMerging`: every
            public checkpoint) or ``"current"`` (MONAI >= 1.5: models trained by fseft). Part of
            the architecture: model files record it; a file without the record is ``"current"``.
        in_channels: input channels (1 for CT).
        dropout_path_rate, drop_rate, attn_drop_rate: regularisation, passed to MONAI.
        fused_attention: without gradients (inference, frozen-feature extraction), compute the
            window attention with ``torch.nn.functional.scaled_dot_product_attention`` (MONAI's
            ``use_flash_attention``) instead of materialising the ``(windows, heads, 343, 343)``
            score tensor; same result up to float rounding, and on this project's 2-core CPU a
            96^3 window of the 48-channel model runs in 5.4 s instead of 9.7 s (fp32). Training
            always takes MONAI's explicit path. A runtime switch (`fused_attention` attribute),
            not part of the architecture: it is not saved in model files.
    """

    arch = "swin_unetr"
    #: encoder = the Swin transformer; decoder = ``decoder1..5`` (what the FSEFT code unfreezes as
    #: "decoder"); the UNETR skip-connection blocks and bottleneck ``encoder1..4``, ``encoder10``
    #: (named "encoder" by MONAI) are skip blocks, frozen with the encoder unless asked for.
    parts = ModelParts(
        encoder=("swinViT",),
        decoder=("decoder5", "decoder4", "decoder3", "decoder2", "decoder1"),
        last_block=("decoder1",),
        skip_blocks=("encoder1", "encoder2", "encoder3", "encoder4", "encoder10"),
    )
    #: the fused ``qkv`` projection (``nn.Linear(C, 3C)``) of every Swin block's attention, and
    #: the blocks' MLPs
    peft_targets = {"attention": ["qkv"], "mlp": ["mlp"]}

    def __init__(
        self,
        class_names: Sequence[str],
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        use_checkpoint: bool = False,
        use_v2: bool = False,
        in_channels: int = 1,
        dropout_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        fused_attention: bool = True,
        patch_merging: str = "current",
    ) -> None:
        super().__init__(class_names, feature_channels=feature_size)
        if patch_merging not in PATCH_MERGING:
            raise ConfigError(f"swin_unetr: unknown patch_merging {patch_merging!r}; choose one of {', '.join(PATCH_MERGING)}")
        net = SwinUNETR(
            in_channels=in_channels,
            out_channels=len(self.class_names),
            feature_size=feature_size,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            use_checkpoint=use_checkpoint,
            use_v2=use_v2,
            dropout_path_rate=dropout_path_rate,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            spatial_dims=3,
            use_flash_attention=fused_attention,
            downsample=PATCH_MERGING[patch_merging],
        )
        # Adopt MONAI's sub-modules under their own names; `out` is replaced by `head`.
        self.swinViT = net.swinViT
        self.encoder1, self.encoder2, self.encoder3 = net.encoder1, net.encoder2, net.encoder3
        self.encoder4, self.encoder10 = net.encoder4, net.encoder10
        self.decoder5, self.decoder4, self.decoder3 = net.decoder5, net.decoder4, net.decoder3
        self.decoder2, self.decoder1 = net.decoder2, net.decoder1
        self.normalize = net.normalize
        self.patch_size = net.patch_size
        self.arch_kwargs = {
            "feature_size": int(feature_size),
            "depths": [int(d) for d in depths],
            "num_heads": [int(h) for h in num_heads],
            "use_checkpoint": bool(use_checkpoint),
            "use_v2": bool(use_v2),
            "in_channels": int(in_channels),
            "dropout_path_rate": float(dropout_path_rate),
            "drop_rate": float(drop_rate),
            "attn_drop_rate": float(attn_drop_rate),
            "patch_merging": patch_merging,
        }

    @property
    def fused_attention(self) -> bool:
        """Whether the Swin window attention uses the fused kernel when no gradient is needed."""
        return all(m.use_flash_attention for m in self.swinViT.modules() if isinstance(m, WindowAttention))

    @fused_attention.setter
    def fused_attention(self, enabled: bool) -> None:
        for m in self.swinViT.modules():
            if isinstance(m, WindowAttention):
                m.use_flash_attention = bool(enabled)

    variant_options = ("patch_merging",)
    downsampling = 32

    @classmethod
    def check_window(cls, size: Sequence[int]) -> None:
        """`ValueError` unless a ``(D, H, W)`` window can pass: each divisible by 32 (five 2x
        patch merges) and more than one bottleneck voxel (its instance norm needs two)."""
        size = check_divisible(size, cls.downsampling, "swin_unetr")
        if math.prod(s // cls.downsampling for s in size) < 2:
            raise ValueError(f"swin_unetr: spatial shape {size} is too small; use at least 64 along one axis")

    #: Points where the network splits into a frozen prefix and the rest (`encode` / `decode`),
    #: each with the top-level modules that run after it: ``hidden`` = the Swin transformer's
    #: hidden states (and the input), ``skips`` = the outputs of the UNETR skip blocks and
    #: bottleneck (what the decoder reads), ``last`` = the inputs of the last decoder block.
    split_points = {
        "hidden": ("encoder1", "encoder2", "encoder3", "encoder4", "encoder10",
                   "decoder5", "decoder4", "decoder3", "decoder2", "decoder1"),
        "skips": ("decoder5", "decoder4", "decoder3", "decoder2", "decoder1"),
        "last": ("decoder1",),
    }

    def encode(self, x: torch.Tensor, point: str) -> dict[str, torch.Tensor]:
        """The tensors at split point `point` (`split_points`) for ``x`` ``(B, 1, D, H, W)``.

        ``hidden``: ``x`` and ``hs0..hs4`` (the Swin stages, ``feature_size * 2**i`` channels at
        1/2 ... 1/32 resolution); ``skips``: ``enc0`` (full resolution), ``enc1..enc3`` (1/2 to
        1/8), ``hs3`` (1/16) and ``dec4`` (the bottleneck, 1/32); ``last``: ``dec0`` (1/2) and
        ``enc0``. ``decode(encode(x, p), p) == features(x)`` for every point."""
        self.check_input(x)
        if point not in self.split_points:
            raise ValueError(f"swin_unetr: no split point {point!r}; choose one of {', '.join(self.split_points)}")
        hidden = self.swinViT(x, self.normalize)
        out = {"x": x, **{f"hs{i}": h for i, h in enumerate(hidden)}}
        if point == "hidden":
            return out
        out = self._skips(out)
        if point == "skips":
            return out
        return {"dec0": self._upper_decoder(out), "enc0": out["enc0"]}

    def decode(self, tensors: dict[str, torch.Tensor], point: str) -> torch.Tensor:
        """The `features` ``(B, feature_size, D, H, W)`` from the tensors `encode` gave at `point`."""
        if point not in self.split_points:
            raise ValueError(f"swin_unetr: no split point {point!r}; choose one of {', '.join(self.split_points)}")
        if point == "hidden":
            tensors = self._skips(tensors)
        if point in ("hidden", "skips"):
            tensors = {"dec0": self._upper_decoder(tensors), "enc0": tensors["enc0"]}
        return self.decoder1(tensors["dec0"], tensors["enc0"])

    def _skips(self, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"enc0": self.encoder1(t["x"]), "enc1": self.encoder2(t["hs0"]), "enc2": self.encoder3(t["hs1"]),
                "enc3": self.encoder4(t["hs2"]), "hs3": t["hs3"], "dec4": self.encoder10(t["hs4"])}

    def _upper_decoder(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        dec3 = self.decoder5(t["dec4"], t["hs3"])
        dec2 = self.decoder4(dec3, t["enc3"])
        dec1 = self.decoder3(dec2, t["enc2"])
        return self.decoder2(dec1, t["enc1"])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` -> ``(B, feature_size, D, H, W)``; D, H, W divisible by 32
        (and not all 32: the bottleneck needs two voxels)."""
        return self.decode(self.encode(x, "hidden"), "hidden")
