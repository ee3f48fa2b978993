"""DICOM Segmentation objects (SEG) of a predicted label map, referencing the source CT series.

A hospital PACS, 3D Slicer (QuantitativeReporting) and OHIF open a DICOM SEG aligned with the
series it references: one frame per source slice that holds a structure, each pointing at its
source instance (SOP Instance UID) and carrying that slice's position. `write_dicom_seg` builds
one with highdicom (``pip install "fseft[dicom-seg]"``): BINARY segmentation type, one segment
per structure of the label map (segment number = label value), each with its name, a SNOMED CT
code where one exists (`segment_codes`), the algorithm (AUTOMATIC, "fseft" and its version) and
its display colour.

fseft's arrays are in `read_image`'s voxel order (``(X, Y, Z)``, rows flipped as dcm2niix does,
slices sorted by position), not in the order of the DICOM files. Each source slice therefore
takes its pixels from the label map by position: the world position of every pixel (Image
Position / Orientation (Patient), Pixel Spacing) is mapped through the label map's affine to its
voxel, so that neither the file order nor the array's orientation matters.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fseft import __version__
from fseft.data.dicom_series import dicom_series_files
from fseft.data.structures import canonical_name, structure_color
from fseft.data.volume import Volume
from fseft.errors import ConfigError, InputFileError
from fseft.utils import atomic_path

if TYPE_CHECKING:
    from pydicom.dataset import Dataset  # optional extra (dicom-seg)

DICOM_SEG_EXTRA = "dicom-seg"
DICOM_SEG_SUFFIX = ".dcm"

# A source pixel must fall within this distance (in voxels) of a voxel centre of the label map.
GRID_TOLERANCE_VOXELS = 1e-2

# Attributes a source slice needs for a SEG to reference it and place its frame.
_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
             "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")


def require_highdicom() -> Any:
    """The `highdicom` module, or a `ConfigError` naming the extra that installs it."""
    try:
        import highdicom  # optional extra: dicom-seg
    except ImportError as exc:
        raise ConfigError(
            "--output-type dicom-seg writes DICOM SEG files with highdicom, which is not installed: "
            f'pip install "fseft[{DICOM_SEG_EXTRA}]" (or pip install highdicom)'
        ) from exc
    return highdicom


# ------------------------------------------------------------------------- structure codes


@dataclass(frozen=True)
class SegmentCodes:
    """The coded meaning of a segment: names of `pydicom.sr.codedict` SNOMED CT concepts
    (``codes.SCT.<name>``), resolved by `resolve`, so that no code value is typed here.

    category: Segmented Property Category (DICOM CID 7150), e.g. "AnatomicalStructure".
    type: Segmented Property Type (CID 7151), e.g. "Kidney".
    modifier: Segmented Property Type Modifier ("Left" / "Right") or None.
    region: an anatomic region of a lesion (e.g. "Liver" for a liver tumour) or None.
    """

    category: str
    type: str
    modifier: str | None = None
    region: str | None = None

    def resolve(self) -> dict[str, Any]:
        """``{"category", "type", "modifier", "region"}`` as pydicom `Code` objects (or None)."""
        from pydicom.sr.codedict import codes  # optional extra: dicom-seg (pydicom comes with highdicom)

        return {key: None if name is None else getattr(codes.SCT, name)
                for key, name in (("category", self.category), ("type", self.type),
                                  ("modifier", self.modifier), ("region", self.region))}


def _organ(type_: str, modifier: str | None = None) -> SegmentCodes:
    return SegmentCodes("AnatomicalStructure", type_, modifier)


def _lesion(type_: str, region: str) -> SegmentCodes:
    return SegmentCodes("MorphologicallyAbnormalStructure", type_, region=region)


# The catalogue's structures (fseft.data.structures) with a SNOMED CT concept in pydicom's code
# dictionary. Paired organs are the organ with a Left / Right modifier (as dcmqi and
# TotalSegmentator encode them); lesions are a neoplasm or cyst with their organ as region.
SEGMENT_CODES: dict[str, SegmentCodes] = {
    "liver": _organ("Liver"), "spleen": _organ("Spleen"), "pancreas": _organ("Pancreas"),
    "gallbladder": _organ("Gallbladder"), "stomach": _organ("Stomach"), "esophagus": _organ("Esophagus"),
    "duodenum": _organ("Duodenum"), "colon": _organ("Colon"), "small_bowel": _organ("SmallIntestine"),
    "rectum": _organ("Rectum"), "urinary_bladder": _organ("Bladder"), "prostate": _organ("Prostate"),
    "brain": _organ("Brain"), "aorta": _organ("Aorta"), "inferior_vena_cava": _organ("InferiorVenaCava"),
    "celiac_trunk": _organ("TruncusCoeliacus"), "portal_vein_and_splenic_vein": _organ("Vein"),
    "hepatic_vessel": SegmentCodes("AnatomicalStructure", "BloodVessel", region="Liver"),
    "vertebrae": _organ("Spine"), "bone": SegmentCodes("Tissue", "Bone"),
    "kidney_left": _organ("Kidney", "Left"), "kidney_right": _organ("Kidney", "Right"),
    "adrenal_gland_left": _organ("AdrenalGland", "Left"), "adrenal_gland_right": _organ("AdrenalGland", "Right"),
    "lung_left": _organ("Lung", "Left"), "lung_right": _organ("Lung", "Right"),
    "femur_left": _organ("Femur", "Left"), "femur_right": _organ("Femur", "Right"),
    "liver_tumor": _lesion("Neoplasm", "Liver"), "kidney_tumor": _lesion("Neoplasm", "Kidney"),
    "kidney_cyst": _lesion("Cyst", "Kidney"), "pancreas_tumor": _lesion("Neoplasm", "Pancreas"),
    "lung_tumor": _lesion("Neoplasm", "Lung"), "colon_tumor": _lesion("Neoplasm", "Colon"),
    "hepatic_vessel_tumor": _lesion("Neoplasm", "Liver"),
}

# Structures without a code of their own ("prostate_or_uterus", names the catalogue lacks): the
# generic SNOMED CT "Anatomical Structure" as both category and type; the segment label keeps
# the structure's name.
FALLBACK_CODES = SegmentCodes("AnatomicalStructure", "AnatomicalStructure")


def segment_codes(name: str) -> SegmentCodes:
    """The codes of a structure (any spelling): its `SEGMENT_CODES` entry, else `FALLBACK_CODES`."""
    return SEGMENT_CODES.get(canonical_name(name), FALLBACK_CODES)


def segment_description(number: int, name: str, algorithm_version: str) -> Any:
    """A highdicom `SegmentDescription`: label `name`, its codes (`segment_codes`), algorithm
    type AUTOMATIC by "fseft" `algorithm_version` (family: artificial intelligence), and the
    structure's display colour (`structure_color`, as CIELab)."""
    hd = require_highdicom()
    from pydicom.sr.codedict import codes  # optional extra: dicom-seg

    coded = segment_codes(name).resolve()
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=name,
        segmented_property_category=coded["category"],
        segmented_property_type=coded["type"],
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="fseft", family=codes.cid7162.ArtificialIntelligence, version=algorithm_version),
        anatomic_regions=None if coded["region"] is None else [coded["region"]],
        display_color=hd.color.CIELabColor.from_rgb(*structure_color(name)),
    )
    if coded["modifier"] is not None:  # laterality: (0062,0011), an optional item of the segment
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept.from_code(coded["modifier"])]
    return description


# ------------------------------------------------------------------------- source series


def read_source_headers(folder: str | os.PathLike, series_id: str | None = None) -> list[Dataset]:
    """The headers (no pixel data) of the DICOM series `read_image` reads from `folder`, in its
    slice order, checked for what a SEG needs to reference and place each slice: single-frame
    images with their SOP Class / Instance, Study, Series and Frame of Reference UIDs, Image
    Position / Orientation (Patient), Pixel Spacing, Rows and Columns.

    Raises `InputFileError` naming the file that lacks one (an anonymised series stripped of
    its UIDs, say) or repeats another file's SOP Instance UID; `ConfigError` without highdicom.
    """
    require_highdicom()
    import pydicom  # optional extra: dicom-seg

    headers: list[Dataset] = []
    seen: dict[str, Path] = {}
    for path in dicom_series_files(folder, series_id):
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except Exception as exc:  # pydicom raises several types for corrupt files
            raise InputFileError(f"{path}: cannot read DICOM header ({type(exc).__name__}: {exc})") from exc
        missing = [key for key in _REQUIRED if not str(ds.get(key, "") or "").strip()]
        if missing:
            raise InputFileError(
                f"{path}: no {', '.join(missing)}; a DICOM SEG references and places each source slice by "
                "them (an anonymised series that dropped its UIDs cannot be referenced): use --output-type nifti"
            )
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise InputFileError(f"{path}: a multi-frame image; DICOM SEG output supports series of single-frame slices")
        uid = str(ds.SOPInstanceUID)
        if uid in seen:
            raise InputFileError(f"{path}: the same SOP Instance UID as {seen[uid]} ({uid})")
        seen[uid] = path
        ds.filename = str(path)
        headers.append(ds)
    return headers


def slice_voxel_indices(header: Dataset, affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Voxel indices ``(3, rows, columns)`` int64 of a label map ``(X, Y, Z)`` with `affine`
    (voxel -> RAS+ mm) at the centre of every pixel of one source slice.

    A pixel ``(r, c)`` lies at ``IPP + c * dc * row_direction + r * dr * column_direction`` (LPS
    mm; ``dr, dc`` = Pixel Spacing), mapped to RAS and through the inverse affine. Raises
    `InputFileError` naming the slice's file when a pixel falls off the label map's voxel
    centres (by more than `GRID_TOLERANCE_VOXELS`) or outside it.
    """
    position = np.asarray([float(v) for v in header.ImagePositionPatient])
    orientation = np.asarray([float(v) for v in header.ImageOrientationPatient]).reshape(2, 3)
    row_spacing, column_spacing = (float(v) for v in header.PixelSpacing)
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    to_voxel = inverse[:3, :3]
    origin = to_voxel @ (lps_to_ras * position) + inverse[:3, 3]
    step_c = to_voxel @ (lps_to_ras * orientation[0] * column_spacing)  # one column to the right
    step_r = to_voxel @ (lps_to_ras * orientation[1] * row_spacing)  # one row down
    rows, columns = int(header.Rows), int(header.Columns)
    r = np.arange(rows, dtype=np.float64)[None, :, None]
    c = np.arange(columns, dtype=np.float64)[None, None, :]
    continuous = origin[:, None, None] + step_r[:, None, None] * r + step_c[:, None, None] * c
    indices = np.rint(continuous)
    where = getattr(header, "filename", None) or f"slice {header.SOPInstanceUID}"
    off_grid = float(np.abs(continuous - indices).max())
    if off_grid > GRID_TOLERANCE_VOXELS:
        raise InputFileError(f"{where}: its pixels lie up to {off_grid:.3g} voxels off the voxel centres of the "
                             "label map; it is not a slice of the scan the mask was computed on")
    indices = indices.astype(np.int64)
    upper = np.asarray(shape[-3:], dtype=np.int64)[:, None, None]
    if (indices < 0).any() or (indices >= upper).any():
        raise InputFileError(f"{where}: lies (partly) outside the label map of shape {tuple(shape[-3:])}; "
                             "it is not a slice of the scan the mask was computed on")
    return indices


def source_slice_labels(labels: np.ndarray, affine: np.ndarray, headers: Sequence[Dataset]) -> np.ndarray:
    """The label map ``(X, Y, Z)`` resampled (exactly, by position) onto each source slice:
    ``(len(headers), rows, columns)``, frame i in the pixel grid of ``headers[i]``."""
    frames = []
    for header in headers:
        ix, iy, iz = slice_voxel_indices(header, affine, labels.shape)
        frames.append(labels[ix, iy, iz])
    return np.stack(frames)


# ------------------------------------------------------------------------- writing


def write_dicom_seg(
    labels: np.ndarray,
    reference: Volume,
    label_map: Mapping[int, str],
    source: str | os.PathLike | Sequence[Dataset],
    path: str | os.PathLike,
    *,
    series_number: int = 900,
    series_description: str = "fseft segmentation",
) -> Path:
    """Write a label map as a DICOM SEG referencing its source series, atomically.

    labels: ``(X, Y, Z)`` integer label map in `reference`'s geometry (the scan `read_image`
        read from the series); value v = structure ``label_map[v]``, 0 = background.
    label_map: value -> structure name, values 1..N; segment number v = label value v (so the
        SEG's segments match the NIfTI label map's values). Every entry gets a segment, empty or
        not; frames are written only for the slices where a segment has pixels.
    source: the series folder, or its headers (`read_source_headers`).
    Patient, study and frame of reference are the source's; the SEG is a new series
    (`series_number`, `series_description`) in the source's study. Returns the path written.
    """
    hd = require_highdicom()

    path = Path(path)
    headers = read_source_headers(source) if isinstance(source, (str, os.PathLike)) else list(source)
    values = sorted(int(v) for v in label_map)
    if values != list(range(1, len(values) + 1)):
        raise ConfigError(f"{path}: DICOM SEG segment numbers are 1..N; the label map has values {values}")
    labels = np.asarray(labels)
    if labels.shape != tuple(reference.spatial_shape):
        raise InputFileError(f"{path}: label map of shape {labels.shape} does not match the shape "
                             f"{reference.spatial_shape} of its reference {reference.source}")
    frames = source_slice_labels(labels, reference.affine, headers)  # (slices, rows, columns)
    unknown = sorted(set(np.unique(frames).tolist()) - {0, *values})
    if unknown:
        raise ConfigError(f"{path}: label values {unknown} are not in the label map {dict(label_map)}")
    frames = frames.astype(np.uint8 if len(values) < 256 else np.uint16)
    descriptions = [segment_description(v, str(label_map[v]), __version__) for v in values]
    seg = hd.seg.Segmentation(
        source_images=headers,
        pixel_array=frames,  # a label map: pixel value = segment number
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="fseft",
        manufacturer_model_name="fseft",
        software_versions=__version__,
        device_serial_number="0",
        content_label="FSEFT",
        content_description=series_description,
        series_description=series_description,
    )
    with atomic_path(path, suffix=DICOM_SEG_SUFFIX) as tmp:
        seg.save_as(str(tmp))
    return path
