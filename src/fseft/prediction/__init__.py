"""`fseft predict`: scans (NIfTI, NRRD, MHA, DICOM) to masks in their own geometry
(`predict_path`, `segment_volume`), and the out-of-depth warnings (`check_scan`)."""


from fseft.prediction.scan_checks import check_scan
from fseft.prediction.segment import PredictResult, find_scans, predict_path, segment_volume

__all__ = ["PredictResult", "check_scan", "find_scans", "predict_path", "segment_volume"]
