"""Structure catalogue: one canonical name per anatomical structure, aliases across datasets,
and the class orders of the public checkpoints.

A user names a structure once (``kidney_left``, ``lKid``, ``lkidney`` or FLARE22 label 13 all
resolve to ``kidney_left``); every other module works with canonical names only.

Canonical names follow TotalSegmentator's snake_case spelling where it has the structure.
"""

from __future__ import annotations

import colorsys
import difflib
import hashlib
import re

from fseft.errors import FseftError

# The 29 structures of the FSEFT foundation model's pre-training, in the order of its
# universal template (output channel i = structure i; FSEFT repository, pretrain/datasets/templates.py).
FSEFT_CLASSES: tuple[str, ...] = (
    "spleen", "kidney_right", "kidney_left", "gallbladder", "esophagus", "liver", "stomach",
    "aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein", "pancreas",
    "adrenal_gland_right", "adrenal_gland_left", "duodenum", "urinary_bladder",
    "prostate_or_uterus", "liver_tumor", "kidney_tumor", "kidney_cyst", "celiac_trunk",
    "lung_right", "lung_left", "bone", "brain", "lung_tumor", "pancreas_tumor",
    "hepatic_vessel", "hepatic_vessel_tumor", "colon_tumor",
)

# CLIP-Driven Universal Model (Liu et al., ICCV 2023): 32 output channels.
CLIPDRIVEN_CLASSES: tuple[str, ...] = (
    "spleen", "kidney_right", "kidney_left", "gallbladder", "esophagus", "liver", "stomach",
    "aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein", "pancreas",
    "adrenal_gland_right", "adrenal_gland_left", "duodenum", "hepatic_vessel", "lung_right",
    "lung_left", "colon", "small_bowel", "rectum", "urinary_bladder", "prostate",
    "femur_left", "femur_right", "celiac_trunk", "kidney_tumor", "liver_tumor",
    "pancreas_tumor", "hepatic_vessel_tumor", "lung_tumor", "colon_tumor", "kidney_cyst",
)

# SuPreM (AbdomenAtlas 1.1, Li et al., ICLR 2024): 25 output channels.
SUPREM_CLASSES: tuple[str, ...] = (
    "aorta", "gallbladder", "kidney_left", "kidney_right", "liver", "pancreas",
    "inferior_vena_cava", "spleen", "stomach", "adrenal_gland_left", "adrenal_gland_right",
    "urinary_bladder", "celiac_trunk", "colon", "duodenum", "esophagus", "femur_left",
    "femur_right", "hepatic_vessel", "small_bowel", "lung_left", "lung_right",
    "portal_vein_and_splenic_vein", "prostate", "rectum",
)

# BTCV (multi-atlas abdomen): 13 organs, label value = position + 1.
BTCV_CLASSES: tuple[str, ...] = (
    "spleen", "kidney_right", "kidney_left", "gallbladder", "esophagus", "liver", "stomach",
    "aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein", "pancreas",
    "adrenal_gland_right", "adrenal_gland_left",
)

# FLARE22: label value -> canonical name.
FLARE22_LABELS: dict[int, str] = {
    1: "liver", 2: "kidney_right", 3: "spleen", 4: "pancreas", 5: "aorta",
    6: "inferior_vena_cava", 7: "adrenal_gland_right", 8: "adrenal_gland_left",
    9: "gallbladder", 10: "esophagus", 11: "stomach", 12: "duodenum", 13: "kidney_left",
}

# Structures the synthetic phantom draws (fseft.data.phantom), in label-value order (value = i + 1).
PHANTOM_CLASSES: tuple[str, ...] = (
    "liver", "spleen", "kidney_right", "kidney_left", "stomach", "pancreas", "gallbladder",
    "aorta", "inferior_vena_cava", "vertebrae",
)

# Other spellings seen in public datasets and code, mapped to the canonical name.
# Keys are compared after normalisation (lower case, separators removed), see `canonical_name`.
ALIASES: dict[str, str] = {
    # kidneys
    "lkid": "kidney_left", "lkidney": "kidney_left", "leftkidney": "kidney_left",
    "kidneyl": "kidney_left",
    "rkid": "kidney_right", "rkidney": "kidney_right", "rightkidney": "kidney_right",
    "kidneyr": "kidney_right",
    # gallbladder
    "gall": "gallbladder", "gallbladder": "gallbladder", "gb": "gallbladder",
    # vessels
    "postcava": "inferior_vena_cava", "ivc": "inferior_vena_cava", "venacava": "inferior_vena_cava",
    "inferiorvenacava": "inferior_vena_cava",
    "psv": "portal_vein_and_splenic_vein", "portalvein": "portal_vein_and_splenic_vein",
    "portalveinandsplenicvein": "portal_vein_and_splenic_vein",
    "arota": "aorta",  # CLIP-Driven's own spelling
    "hv": "hepatic_vessel", "hepaticvessel": "hepatic_vessel",
    "hvt": "hepatic_vessel_tumor", "hepaticvesseltumor": "hepatic_vessel_tumor",
    "celiactruck": "celiac_trunk", "celiactrunk": "celiac_trunk",
    # adrenal glands
    "rag": "adrenal_gland_right", "radrenal": "adrenal_gland_right",
    "rightadrenalgland": "adrenal_gland_right", "adrenalgland_r": "adrenal_gland_right",
    "lag": "adrenal_gland_left", "ladrenal": "adrenal_gland_left",
    "leftadrenalgland": "adrenal_gland_left",
    # lungs
    "rlung": "lung_right", "rightlung": "lung_right",
    "llung": "lung_left", "leftlung": "lung_left",
    # pelvis
    "bladder": "urinary_bladder", "urinarybladder": "urinary_bladder",
    "prostut": "prostate_or_uterus", "prostateuterus": "prostate_or_uterus",
    "femurl": "femur_left", "leftheadoffemur": "femur_left",
    "femurr": "femur_right", "rightheadoffemur": "femur_right",
    # bowel
    "intestine": "small_bowel", "smallbowel": "small_bowel", "smallintestine": "small_bowel",
    # spine (the phantom has one vertebral column label)
    "spine": "vertebrae", "vertebralcolumn": "vertebrae",
}

_NON_ALNUM = re.compile(r"[^a-z0-9]")


def _normalise(name: str) -> str:
    return _NON_ALNUM.sub("", name.strip().lower())


def _known_names() -> set[str]:
    names: set[str] = set()
    for group in (FSEFT_CLASSES, CLIPDRIVEN_CLASSES, SUPREM_CLASSES, PHANTOM_CLASSES):
        names.update(group)
    names.update(ALIASES.values())
    return names


_CANONICAL_BY_KEY: dict[str, str] = {_normalise(n): n for n in _known_names()}
_CANONICAL_BY_KEY.update({_normalise(k): v for k, v in ALIASES.items()})


def did_you_mean(name: str) -> str:
    """`` (did you mean 'liver'?)`` for a near-miss of a catalogued name, else ``""``."""
    close = difflib.get_close_matches(_normalise(name), list(_CANONICAL_BY_KEY), n=1, cutoff=0.75)
    return f" (did you mean {_CANONICAL_BY_KEY[close[0]]!r}?)" if close else ""


def canonical_name(name: str, *, strict: bool = False) -> str:
    """Return the canonical name of a structure given any known spelling.

    Unknown names are returned in normalised snake_case (lower case, spaces and dashes as
    ``_``) so that datasets can bring structures the catalogue does not list, unless
    ``strict`` is set, in which case an unknown name raises `UnknownStructureError`.
    """
    key = _normalise(name)
    if key in _CANONICAL_BY_KEY:
        return _CANONICAL_BY_KEY[key]
    if strict:
        raise UnknownStructureError(
            f"unknown structure {name!r}{did_you_mean(name)}; known structures include: "
            + ", ".join(sorted(_known_names()))
        )
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")


def canonical_names(names: list[str] | tuple[str, ...] | str, *, strict: bool = False) -> tuple[str, ...]:
    """Canonical names of a list of structures, or of a comma-separated string; order kept,
    duplicates removed."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    out: list[str] = []
    for n in names:
        c = canonical_name(n, strict=strict)
        if c not in out:
            out.append(c)
    return tuple(out)


# Structures that are several separate pieces in a normal scan, so that "keep the largest
# connected component" would delete real anatomy: the vertebral column (separated at the
# intervertebral discs as soon as a prediction thins there), lesions and cysts (often several),
# vessel trees and small-bowel loops (cut by the field of view or thin branches).
MULTI_PART_STRUCTURES: frozenset[str] = frozenset({
    "vertebrae", "hepatic_vessel", "small_bowel", "kidney_tumor", "kidney_cyst", "liver_tumor",
    "pancreas_tumor", "hepatic_vessel_tumor", "lung_tumor", "colon_tumor",
})


def is_multi_part(name: str) -> bool:
    """Whether `name` (any spelling) is a structure made of several separate pieces
    (`MULTI_PART_STRUCTURES`), which largest-connected-component post-processing leaves whole."""
    return canonical_name(name) in MULTI_PART_STRUCTURES


# Display colours (RGB, 0-255) of the catalogue's structures: the 3D Slicer colour table beside
# every label map and the recommended display colour of each DICOM SEG segment. Left and right
# organs differ in shade; organs of one system share a hue (veins blue, arteries red, lesions
# green-yellow). fseft's own choice, fixed so that a structure looks the same in every output.
STRUCTURE_COLORS: dict[str, tuple[int, int, int]] = {
    "liver": (190, 90, 70), "spleen": (150, 95, 175), "kidney_right": (225, 165, 75),
    "kidney_left": (195, 130, 45), "gallbladder": (120, 190, 80), "esophagus": (215, 175, 135),
    "stomach": (245, 205, 160), "duodenum": (250, 180, 130), "pancreas": (250, 220, 95),
    "aorta": (220, 40, 45), "celiac_trunk": (240, 90, 90), "inferior_vena_cava": (55, 85, 205),
    "portal_vein_and_splenic_vein": (95, 140, 230), "hepatic_vessel": (130, 170, 240),
    "adrenal_gland_right": (240, 130, 60), "adrenal_gland_left": (215, 105, 35),
    "urinary_bladder": (205, 200, 65), "prostate_or_uterus": (230, 160, 200), "prostate": (230, 150, 190),
    "lung_right": (175, 215, 235), "lung_left": (145, 195, 225), "brain": (250, 235, 225),
    "bone": (240, 235, 210), "vertebrae": (230, 220, 180), "femur_right": (225, 215, 185),
    "femur_left": (205, 195, 160), "colon": (205, 150, 110), "small_bowel": (225, 160, 120),
    "rectum": (180, 120, 90), "liver_tumor": (100, 230, 60), "kidney_tumor": (170, 240, 50),
    "kidney_cyst": (80, 220, 200), "pancreas_tumor": (210, 245, 40), "lung_tumor": (60, 240, 120),
    "hepatic_vessel_tumor": (40, 200, 90), "colon_tumor": (130, 200, 30),
}


def structure_color(name: str) -> tuple[int, int, int]:
    """The display colour (RGB, 0-255) of a structure (any spelling): its `STRUCTURE_COLORS`
    entry, else one derived from the canonical name's MD5 digest (a hue at fixed saturation and
    brightness), so a structure the catalogue lacks also keeps one colour across runs."""
    canonical = canonical_name(name)
    if canonical in STRUCTURE_COLORS:
        return STRUCTURE_COLORS[canonical]
    hue = int.from_bytes(hashlib.md5(canonical.encode()).digest()[:2], "big") / 65536.0
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, 0.65, 0.9))  # type: ignore[return-value]


def is_known(name: str) -> bool:
    """Whether `name` (any spelling) is in the catalogue."""
    return _normalise(name) in _CANONICAL_BY_KEY


class UnknownStructureError(FseftError, KeyError):
    """A structure name that neither the catalogue nor the dataset knows."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
