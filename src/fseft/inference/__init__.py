"""Running a network over whole volumes: the sliding window (`InferenceConfig`,
`predict_probabilities`) and the on-disk cache of a frozen model's features (`FeatureCache`)."""


from fseft.inference.feature_cache import CacheError, FeatureCache, compute_features, model_fingerprint
from fseft.inference.sliding_window import (
    InferenceConfig,
    predict_probabilities,
    recommended_roi_size,
    sliding_window_map,
)

__all__ = ["CacheError", "FeatureCache", "InferenceConfig", "compute_features", "model_fingerprint", "predict_probabilities", "recommended_roi_size", "sliding_window_map"]
