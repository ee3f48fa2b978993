"""A DICOM dataset: CT series annotated with DICOM SEG objects (what OHIF or 3D Slicer save to a
PACS), as fseft cases for ``fseft adapt --data`` and ``fseft datasets inspect``.

Two sources:

- a folder of studies: one sub-folder per study (any file names, any nesting), each holding a CT
  series and one or more DICOM SEG objects that reference it;
- a text file of DICOMweb study URLs (one per line, ``#`` comments), each study's CT series and
  SEG series retrieved by WADO-RS (`fseft.data.dicomweb`).

Every SEG is checked and converted before any training, into one binary NIfTI mask per
structure on the CT's voxel grid (`read_image`'s), in a per-process temporary workspace
removed at exit (patient data are not left behind in a cache). A SEG that references another
series, or whose frames do not lie on the CT's slices (another frame of reference, other
rows / columns, orientation or positions, a referenced instance that is not a slice of the CT),
is an `InputFileError` naming the SEG.

Segments map to catalogue structures by their SNOMED CT codes (`fseft.data.dicom_seg.SEGMENT_CODES`,
laterality modifier included), else by their label (`canonical_name`; a near miss of a
catalogued name is an error with a "did you mean").
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fseft.data.dicom_seg import SEGMENT_CODES, read_source_headers, require_highdicom, slice_voxel_indices
from fseft.data.dicomweb import (
    find_ct_series,
    is_dicomweb_url,
    make_client,
    parse_study_url,
    retrieve_series,
    study_series,
)
from fseft.data.io import read_image, write_mask
from fseft.data.structures import canonical_name, did_you_mean, is_known
from fseft.data.volume import Volume
from fseft.errors import InputFileError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset  # optional extra (dicom-seg)

DICOM_LAYOUT = "dicom"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
CT_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1")  # CT, Enhanced CT

# A SEG frame lies on a CT slice when their positions differ by less than this (mm).
POSITION_TOLERANCE_MM = 1e-2

# How many files `is_dicom_dataset` looks at before deciding a folder holds no DICOM.
_PROBE_FILES = 64


@dataclass
class DicomCase:
    """One annotated (or unannotated) CT series: `image` a folder holding that series alone,
    `label_files` canonical structure -> binary NIfTI mask converted from its SEG(s)."""

    case_id: str
    image: Path
    label_files: dict[str, Path] = field(default_factory=dict)
    segs: list[str] = field(default_factory=list)  # where each SEG came from (file or URL)


@dataclass
class DicomListing:
    """What `read_dicom_dataset` found: the `Dataset` fields of a DICOM dataset."""

    name: str
    root: Path
    cases: list[DicomCase]
    original_names: dict[str, str]


# ------------------------------------------------------------------------- workspace

_WORKSPACE: Path | None = None


def workspace() -> Path:
    """This process's scratch folder for retrieved studies and converted masks (removed at exit)."""
    global _WORKSPACE
    if _WORKSPACE is None or not _WORKSPACE.is_dir():
        _WORKSPACE = Path(tempfile.mkdtemp(prefix="fseft-dicom-dataset-"))
        atexit.register(shutil.rmtree, _WORKSPACE, True)
    return _WORKSPACE


# ------------------------------------------------------------------------- detection


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def read_url_list(path: str | os.PathLike) -> list[str]:
    """The study URLs of a text file (one per line; blank lines and ``#`` comments skipped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{path}: cannot read the list of DICOMweb study URLs ({exc})") from exc
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def is_dicom_dataset(path: str | os.PathLike) -> bool:
    """Whether `path` is a DICOM dataset: a text file whose first entry is an http(s) URL, or a
    folder (without a dataset.json) whose files include DICOM files (a look at the first few)."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.stat().st_size > 1_000_000 or _is_dicom_file(path):
            return False
        try:
            urls = read_url_list(path)
        except InputFileError:
            return False
        return bool(urls) and is_dicomweb_url(urls[0])
    if not path.is_dir() or (path / "dataset.json").exists():
        return False
    for n, file in enumerate(p for p in path.rglob("*") if p.is_file()):
        if n >= _PROBE_FILES:
            return False
        if _is_dicom_file(file):
            return True
    return False


# ------------------------------------------------------------------------- segment -> structure


def _code_key(item: Dataset | None) -> str | None:
    return None if item is None else f"{item.CodingSchemeDesignator}:{item.CodeValue}"


def _first(ds: Any, keyword: str) -> Any:
    seq = getattr(ds, keyword, None)
    return seq[0] if seq else None


def _catalogue_by_code() -> dict[tuple[str | None, str | None], list[tuple[str, str | None]]]:
    """(type code, modifier code) -> [(structure, region code or None)] of `SEGMENT_CODES`."""
    table: dict[tuple[str | None, str | None], list[tuple[str, str | None]]] = {}
    for name, codes in SEGMENT_CODES.items():
        coded = codes.resolve()
        key = (f"{coded['type'].scheme_designator}:{coded['type'].value}",
               None if coded["modifier"] is None else f"{coded['modifier'].scheme_designator}:{coded['modifier'].value}")
        region = None if coded["region"] is None else f"{coded['region'].scheme_designator}:{coded['region'].value}"
        table.setdefault(key, []).append((name, region))
    return table


def segment_structure(segment: Dataset, where: str) -> str:
    """The canonical structure of one item of a SEG's Segment Sequence: by its SNOMED CT property
    type (+ laterality modifier, + anatomic region for lesions and vessels), else by its label.

    A code shared by several structures (a liver neoplasm) is settled by the label; a label that
    is a near miss of a catalogued name raises `InputFileError` naming `where` and the segment."""
    label = str(getattr(segment, "SegmentLabel", "") or "").strip()
    number = int(segment.SegmentNumber)
    prop = _first(segment, "SegmentedPropertyTypeCodeSequence")
    # laterality: inside the type item (DICOM 2014+), or beside it in older objects
    modifier = _first(prop, "SegmentedPropertyTypeModifierCodeSequence") if prop is not None else None
    modifier = modifier or _first(segment, "SegmentedPropertyTypeModifierCodeSequence")
    region = _code_key(_first(segment, "AnatomicRegionSequence"))
    candidates = [name for name, needs in _catalogue_by_code().get((_code_key(prop), _code_key(modifier)), [])
                  if needs is None or needs == region]
    by_label = canonical_name(label) if label else None
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        if by_label in candidates:
            return by_label
        raise InputFileError(f"{where}: segment {number} {label!r}: its code ({prop.CodeMeaning}) fits "
                             f"{', '.join(candidates)}; label it with one of these names")
    if not label:
        raise InputFileError(f"{where}: segment {number} has no label and its code is not in fseft's catalogue; "
                             "label it with a structure name (e.g. liver)")
    hint = did_you_mean(label)
    if not is_known(by_label) and hint:
        raise InputFileError(f"{where}: segment {number} label {label!r} is not a known structure{hint}; "
                             "rename the segment or give it the structure's SNOMED CT code")
    return by_label


# ------------------------------------------------------------------------- SEG -> masks


def _frame_items(seg: Dataset, n_frames: int) -> list[tuple[Any, Any]]:
    """(per-frame item, shared item) per frame."""
    shared = _first(seg, "SharedFunctionalGroupsSequence")
    per_frame = list(getattr(seg, "PerFrameFunctionalGroupsSequence", []) or [])
    if len(per_frame) != n_frames:
        raise InputFileError(f"has {n_frames} frames but {len(per_frame)} per-frame functional group items")
    return [(item, shared) for item in per_frame]


def _functional(item: Any, shared: Any, keyword: str) -> Any:
    """A functional group macro's item, per frame or else shared."""
    for group in (item, shared):
        if group is not None and getattr(group, keyword, None):
            return getattr(group, keyword)[0]
    return None


def seg_masks(seg: Dataset, where: str, headers: Sequence[Dataset], volume: Volume) -> dict[int, np.ndarray]:
    """The segments of a DICOM SEG on the CT grid: segment number -> ``(X, Y, Z)`` uint8 mask.

    headers: the CT series' slices (`read_source_headers`), volume: the CT as `read_image`
    reads it (its affine and shape). Each frame is placed on the CT slice at its position
    (Plane Position), which must also be the slice it references (Derivation / Source Image),
    when it names one. BINARY, FRACTIONAL (> half the maximum) and LABELMAP segmentations.
    Raises `InputFileError` naming `where` when the SEG does not reference the CT's series or
    its frames do not lie on the CT's slices.
    """
    ct_series = str(headers[0].SeriesInstanceUID)
    referenced = [str(s.SeriesInstanceUID) for s in getattr(seg, "ReferencedSeriesSequence", []) or []]
    if referenced and ct_series not in referenced:
        raise InputFileError(f"{where}: references series {', '.join(referenced)}, not the CT series {ct_series} "
                             "it is stored with; export the SEG made on this series")
    if str(getattr(seg, "FrameOfReferenceUID", "")) != str(headers[0].FrameOfReferenceUID):
        raise InputFileError(f"{where}: frame of reference {getattr(seg, 'FrameOfReferenceUID', None)} is not the CT "
                             f"series' ({headers[0].FrameOfReferenceUID}); it was not drawn on this series")
    if (int(seg.Rows), int(seg.Columns)) != (int(headers[0].Rows), int(headers[0].Columns)):
        raise InputFileError(f"{where}: frames of {seg.Rows} x {seg.Columns} pixels do not match the CT slices of "
                             f"{headers[0].Rows} x {headers[0].Columns}")
    n_frames = int(getattr(seg, "NumberOfFrames", 1) or 1)
    pixels = np.asarray(seg.pixel_array).reshape(n_frames, int(seg.Rows), int(seg.Columns))
    kind = str(getattr(seg, "SegmentationType", "BINARY"))
    if kind == "FRACTIONAL":
        pixels = pixels > float(getattr(seg, "MaximumFractionalValue", 255)) / 2
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    by_uid = {str(h.SOPInstanceUID): k for k, h in enumerate(headers)}
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    ct_orientation = np.array([float(v) for v in headers[0].ImageOrientationPatient])
    masks = {n: np.zeros(volume.spatial_shape, np.uint8) for n in numbers}
    slice_index = [slice_voxel_indices(h, volume.affine, volume.spatial_shape) for h in headers]
    try:
        items = _frame_items(seg, n_frames)
    except InputFileError as exc:
        raise InputFileError(f"{where}: {exc}") from None
    for i, (item, shared) in enumerate(items):
        plane = _functional(item, shared, "PlanePositionSequence")
        orient = _functional(item, shared, "PlaneOrientationSequence")
        if orient is not None and not np.allclose([float(v) for v in orient.ImageOrientationPatient], ct_orientation,
                                                  atol=1e-4):
            raise InputFileError(f"{where}: frame {i + 1} is oriented {list(orient.ImageOrientationPatient)}, the CT "
                                 f"slices {ct_orientation.tolist()}; its frames do not match the CT's slices")
        source = _functional(item, None, "DerivationImageSequence")
        source = _first(source, "SourceImageSequence") if source is not None else None
        k = None
        if plane is not None:
            position = np.array([float(v) for v in plane.ImagePositionPatient])
            distance = np.linalg.norm(positions - position, axis=1)
            k = int(np.argmin(distance))
            if distance[k] > POSITION_TOLERANCE_MM:
                raise InputFileError(f"{where}: frame {i + 1} at position {position.round(3).tolist()} mm lies on no "
                                     "slice of the CT series; its frames do not match the CT's slices")
        if source is not None:
            uid = str(source.ReferencedSOPInstanceUID)
            if uid not in by_uid:
                raise InputFileError(f"{where}: frame {i + 1} references instance {uid}, which is not a slice of the "
                                     f"CT series {ct_series}")
            if k is not None and by_uid[uid] != k:
                raise InputFileError(f"{where}: frame {i + 1} references instance {uid} but lies at another slice's "
                                     "position; its frames do not match the CT's slices")
            k = by_uid[uid]
        if k is None:
            raise InputFileError(f"{where}: frame {i + 1} has neither a position nor a source instance; cannot place it")
        ix, iy, iz = slice_index[k]
        if kind == "LABELMAP":
            for n in numbers:
                masks[n][ix, iy, iz] |= (pixels[i] == n).astype(np.uint8)
            continue
        ident = _functional(item, shared, "SegmentIdentificationSequence")
        number = int(ident.ReferencedSegmentNumber)
        if number not in masks:
            raise InputFileError(f"{where}: frame {i + 1} belongs to segment {number}, which the SEG does not describe")
        masks[number][ix, iy, iz] |= (pixels[i] > 0).astype(np.uint8)
    return masks


# ------------------------------------------------------------------------- reading a dataset


def _headers(files: Sequence[Path]) -> list[tuple[Path, Dataset]]:
    import pydicom  # optional extra: dicom-seg

    out = []
    for path in files:
        try:
            out.append((path, pydicom.dcmread(str(path), stop_before_pixels=True)))
        except Exception:  # not DICOM (a README, a DICOMDIR's friends): not part of a series
            continue
    return out


def _series_folder(files: Sequence[Path], scratch: Path) -> Path:
    """A folder holding the series `files` alone, which `read_image` reads exactly: their own
    folder when nothing else is in it (a stable path, so feature caches keyed by it hit again),
    else `scratch` with a link to each file."""
    own = {f.parent for f in files}
    if len(own) == 1:
        folder = own.pop()
        if {p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")} == set(files) and \
                not any(p.is_dir() for p in folder.iterdir()):
            return folder
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    for n, f in enumerate(files):
        (scratch / f"{n:05d}.dcm").symlink_to(f.resolve())
    return scratch


def _where(source: str, folder: Path, path: Path, ds: Dataset) -> str:
    """How messages name a SEG: its file in a local study, its SOP Instance UID in a retrieved one."""
    return f"{path}" if source == str(folder) else f"{source}: SEG {ds.SOPInstanceUID}"


def _study_case(study_id: str, folder: Path, source: str, out: Path) -> list[DicomCase]:
    """The cases of one study folder (`source`: its folder or URL, for messages): its CT series
    (each linked alone into ``out/<series>``) with the masks of the SEGs referencing them."""
    require_highdicom()  # pydicom comes with it
    import pydicom  # optional extra: dicom-seg
    found = _headers(sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")))
    ct: dict[str, list[Path]] = {}
    segs: list[tuple[Path, Dataset]] = []
    for path, ds in found:
        sop_class = str(getattr(ds, "SOPClassUID", ""))
        if sop_class == SEG_SOP_CLASS:
            segs.append((path, ds))
        elif getattr(ds, "Modality", None) == "CT" and sop_class in CT_SOP_CLASSES:
            ct.setdefault(str(ds.SeriesInstanceUID), []).append(path)
    if not ct:
        raise InputFileError(f"{source}: no CT series in this study (DICOM files found: {len(found)})")
    by_series: dict[str, list[tuple[Path, Dataset]]] = {uid: [] for uid in ct}
    for path, ds in segs:
        where = _where(source, folder, path, ds)
        referenced = [str(s.SeriesInstanceUID) for s in getattr(ds, "ReferencedSeriesSequence", []) or []]
        target = next((uid for uid in referenced if uid in ct), None)
        if target is None:
            raise InputFileError(f"{where} references series {', '.join(referenced) or '(none)'}, which is not a CT "
                                 f"series of this study ({', '.join(ct)}); export the SEG made on this study's CT")
        by_series[target].append((path, ds))
    cases = []
    for n, (series_uid, files) in enumerate(sorted(ct.items())):
        case_id = study_id if len(ct) == 1 else f"{study_id}_{n + 1}"
        image = _series_folder(files, out / "series" / case_id)
        case = DicomCase(case_id, image)
        if by_series[series_uid]:
            headers = read_source_headers(image)
            volume = read_image(image)
            for path, header in by_series[series_uid]:
                where = _where(source, folder, path, header)
                seg = pydicom.dcmread(str(path))
                names = {int(s.SegmentNumber): segment_structure(s, where) for s in seg.SegmentSequence}
                masks = seg_masks(seg, where, headers, volume)
                for number, name in names.items():
                    if name in case.label_files:
                        raise InputFileError(f"{where}: segment {number} is {name}, which another SEG of this series "
                                             f"({'; '.join(case.segs)}) annotates too; keep one")
                    target = out / "labels" / case_id / f"{name}.nii.gz"
                    case.label_files[name] = write_mask(masks[number], volume, target)
                case.segs.append(where)
        cases.append(case)
    return cases


def _read_folder(root: Path) -> list[DicomCase]:
    out = workspace() / f"folder-{len(list(workspace().iterdir()))}"
    studies = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = [p for p in root.iterdir() if p.is_file() and _is_dicom_file(p)]
    if loose and not studies:
        studies = [root]  # a single study given as the folder itself
    elif loose:
        raise InputFileError(f"{root}: DICOM files beside study folders ({loose[0].name}, ...); a DICOM dataset is "
                             "one sub-folder per study")
    cases: list[DicomCase] = []
    for study in studies:
        cases += _study_case(study.name, study, str(study), out)
    return cases


def _read_urls(path: Path) -> list[DicomCase]:
    """Retrieve every study of a URL list (its CT series and its SEG series) and read it."""
    urls = read_url_list(path)
    if not urls:
        raise InputFileError(f"{path}: no DICOMweb study URLs in this file")
    out = workspace() / f"urls-{len(list(workspace().iterdir()))}"
    cases: list[DicomCase] = []
    seen: set[str] = set()
    for url in urls:
        ref = parse_study_url(url)
        if ref.study in seen:
            raise InputFileError(f"{path}: study {ref.study} is listed twice")
        seen.add(ref.study)
        client = make_client(ref.root)
        ct = find_ct_series(client, ref)
        seg_series = [s for s in study_series(client, ref) if s.modality == "SEG"]
        folder = out / "studies" / ref.study
        retrieve_series(client, ref.root, ref.study, ct.uid, folder / ct.uid)
        for s in seg_series:
            retrieve_series(client, ref.root, ref.study, s.uid, folder / s.uid)
        cases += _study_case(ref.study, folder, f"{ref.root}/studies/{ref.study}", out)
    return cases


def read_dicom_dataset(path: str | os.PathLike) -> DicomListing:
    """Read a DICOM dataset (a folder of studies, or a text file of DICOMweb study URLs) into
    cases with converted masks; every SEG checked (see the module's docstring)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise InputFileError(f"{root}: no such DICOM dataset folder or URL list")
    cases = _read_urls(root) if root.is_file() else _read_folder(root)
    if not cases:
        raise InputFileError(f"{root}: no studies found (expected one sub-folder per study: a CT series and its SEGs)")
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        raise InputFileError(f"{root}: two studies with one case id ({ids})")
    name = root.stem if root.is_file() else root.name
    return DicomListing(name, root, sorted(cases, key=lambda c: c.case_id), {})

