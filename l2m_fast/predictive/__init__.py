"""The Monte-Carlo posterior predictive, batched: plan (vmap or loop, chunk size), evaluate, results.

* :mod:`.plan`: how the samples are evaluated (:func:`plan_predict`, :class:`PredictPlan`);
* :mod:`.evaluate`: :func:`predict`, the chunked evaluation;
* :mod:`.results`: :class:`RegressionPrediction`, :class:`ClassificationPrediction` and the streaming
  reductions that build them.
"""

from .evaluate import predict
from .plan import CACHE_BYTES, DEFAULT_MAX_MEMORY, PredictPlan, plan_predict
from .results import ClassificationPrediction, RegressionPrediction

__all__ = [
    "predict",
    "plan_predict",
    "PredictPlan",
    "RegressionPrediction",
    "ClassificationPrediction",
    "DEFAULT_MAX_MEMORY",
    "CACHE_BYTES",
]
