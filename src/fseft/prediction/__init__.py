"""Segmenting scans: one scan in memory (`segment_volume`; `Segmenter`, the Python API's model:
`load_model`, `load_run`), `fseft predict` over files, DICOM folders and PACS studies
(`predict_path`), and the out-of-depth warnings (`check_scan`)."""


from fseft.prediction.predict import PredictResult, find_scans, predict_path
from fseft.prediction.scan_checks import check_scan
from fseft.prediction.segment import segment_volume
from fseft.prediction.segmenter import Segmentation, Segmenter, load_model, load_run

__all__ = ["PredictResult", "Segmentation", "Segmenter", "check_scan", "find_scans", "load_model", "load_run",
           "predict_path", "segment_volume"]
