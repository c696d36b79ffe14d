"""l2m_fast: L2M posteriors (Laplace from the optimizer's second moment), sampled by a fused kernel."""

from . import ops
from ._version import __version__
from .calibration import CalibrationReport, calibrate
from .ensemble import L2MEnsemble
from .fisher import FisherEstimate, FisherTracker, fisher_diag
from .holds import InPlaceOrderError, ModelInUseError
from .inplace import ParamBinding, SampleIterator, SampleWriter
from .layout import FlatLayout, ParamSlot
from .posterior import L2MPosterior, SampleBatch
from .predictive import ClassificationPrediction, PredictPlan, RegressionPrediction, plan_predict, predict

__all__ = [
    "L2MPosterior",
    "SampleBatch",
    "FlatLayout",
    "ParamSlot",
    "L2MEnsemble",
    "FisherTracker",
    "FisherEstimate",
    "fisher_diag",
    "calibrate",
    "CalibrationReport",
    "ParamBinding",
    "SampleWriter",
    "SampleIterator",
    "InPlaceOrderError",
    "ModelInUseError",
    "RegressionPrediction",
    "ClassificationPrediction",
    "PredictPlan",
    "plan_predict",
    "predict",
    "ops",
    "__version__",
]
