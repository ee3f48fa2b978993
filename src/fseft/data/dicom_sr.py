"""Structure volumes as a DICOM Structured Report: a TID 1500 measurement report (highdicom)
that a PACS stores beside the SEG it measures, and that OHIF / 3D Slicer list with it.

One volumetric ROI measurement group (TID 1411) per segment of the SEG, each referencing its
segment (Referenced Segment: the SEG's SOP Instance UID + segment number), tracked by the
structure's name, with the measurements of `fseft.evaluation.statistics.structure_statistics`:
Volume (SNOMED CT 118565006, ml) and, for a non-empty structure, the mean attenuation
coefficient (DCM 112031, derivation Mean, Hounsfield units). The values are those of
``statistics.json``, unrounded, so the two never disagree.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fseft import __version__
from fseft.data.dicom_seg import require_highdicom
from fseft.errors import InputFileError
from fseft.utils import atomic_path

if TYPE_CHECKING:
    from pydicom.dataset import Dataset  # optional extra (dicom-seg)

REPORT_SERIES_NUMBER = 901
REPORT_SERIES_DESCRIPTION = "fseft structure volumes"


def _units() -> dict[str, Any]:
    import highdicom as hd  # optional extra: dicom-seg
    from pydicom.sr.codedict import codes  # optional extra: dicom-seg (pydicom comes with highdicom)

    return {
        "ml": hd.sr.CodedConcept("ml", "UCUM", "milliliter"),
        "hu": codes.UCUM.HounsfieldUnit,
        "attenuation": codes.DCM.AttenuationCoefficient,
    }


def measurement_report(seg: Dataset, statistics: Mapping[str, Mapping[str, Any]], *,
                       series_number: int = REPORT_SERIES_NUMBER) -> Dataset:
    """A Comprehensive 3D SR (TID 1500) of `statistics` (structure -> {"volume_ml", "hu_mean",
    ...}, one case of ``statistics.json``) measured on the segments of the DICOM SEG `seg`.

    A structure matches the segment whose label is its name (as `write_dicom_seg` labels them);
    a structure without a segment is an `InputFileError`. The report is a new series in the SEG's
    study, with the SEG as evidence.
    """
    hd = require_highdicom()
    from pydicom.sr.codedict import codes  # optional extra: dicom-seg

    units = _units()
    segments = {str(s.SegmentLabel): s for s in seg.SegmentSequence}
    missing = [name for name in statistics if name not in segments]
    if missing:
        raise InputFileError(f"SEG {seg.SOPInstanceUID}: no segment labelled {', '.join(missing)} "
                             f"(its segments: {', '.join(segments)})")
    source_series = str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    algorithm = hd.sr.AlgorithmIdentification(name="fseft", version=__version__)
    groups = []
    for name, values in statistics.items():
        segment = segments[name]
        number = int(segment.SegmentNumber)
        # built by hand, not ReferencedSegment.from_segmentation: an empty segment has no frames
        referenced = hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(source_series))
        measurements = [hd.sr.Measurement(name=codes.SCT.Volume, value=float(values["volume_ml"]), unit=units["ml"],
                                          algorithm_id=algorithm)]
        if values.get("hu_mean") is not None:  # an empty structure has a volume (0) but no mean
            measurements.append(hd.sr.Measurement(name=units["attenuation"], value=float(values["hu_mean"]),
                                                  unit=units["hu"], derivation=codes.SCT.Mean, algorithm_id=algorithm))
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=name),
            referenced_segment=referenced,
            finding_type=hd.sr.CodedConcept.from_dataset(segment.SegmentedPropertyTypeCodeSequence[0]),
            algorithm_id=algorithm,
            measurements=measurements,
        ))
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="fseft", manufacturer_name="fseft", model_name=__version__),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[seg],
        content=report,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="fseft",
        series_description=REPORT_SERIES_DESCRIPTION,
    )


def write_measurement_report(seg_path: str | os.PathLike, statistics: Mapping[str, Mapping[str, Any]],
                             path: str | os.PathLike) -> Path:
    """`measurement_report` of the SEG file `seg_path`, written to `path` atomically."""
    import pydicom  # optional extra: dicom-seg

    report = measurement_report(pydicom.dcmread(str(seg_path)), statistics)
    path = Path(path)
    with atomic_path(path) as tmp:
        report.save_as(tmp, enforce_file_format=True)
    return path


def read_measurement_report(report: Dataset) -> dict[str, dict[str, Any]]:
    """The measurements of a TID 1500 report, per tracked structure: ``{name: {"volume_ml",
    "hu_mean" (absent for an empty structure), "segment_number", "seg_uid"}}``."""
    import highdicom as hd  # optional extra: dicom-seg
    from pydicom.sr.codedict import codes  # optional extra: dicom-seg

    units = _units()
    content = hd.sr.Comprehensive3DSR.from_dataset(report).content
    parsed = hd.sr.MeasurementReport.from_sequence(content)
    result: dict[str, dict[str, Any]] = {}
    for group in parsed.get_volumetric_roi_measurement_groups():
        segment = group.referenced_segment
        numbers = segment.referenced_segment_numbers
        entry: dict[str, Any] = {"seg_uid": str(segment.referenced_sop_instance_uid),
                                 "segment_number": int(numbers[0]) if numbers else None}
        for measurement in group.get_measurements():
            if measurement.name == codes.SCT.Volume:
                entry["volume_ml"] = float(measurement.value)
            elif measurement.name == units["attenuation"]:
                entry["hu_mean"] = float(measurement.value)
        result[str(group.tracking_identifier)] = entry
    return result
