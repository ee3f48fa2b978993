"""Few-shot adaptation (`fseft adapt`): the run's settings (`AdaptConfig`), `adapt` (task,
base, dispatch), the feature and network runners, the method choice of ``--method auto``,
query scoring and the encoder cache."""


from fseft.adaptation.config import AUTO, AdaptConfig
from fseft.adaptation.method_choice import MethodEntry, parse_candidates
from fseft.adaptation.query_scoring import evaluate_queries
from fseft.adaptation.runner import adapt, count_parameters

__all__ = ["AUTO", "AdaptConfig", "MethodEntry", "adapt", "count_parameters", "evaluate_queries", "parse_candidates"]
