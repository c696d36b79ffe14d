"""l2m_fast: L2M posteriors (Laplace from the optimizer's second moment), sampled by a fused kernel."""

from . import ops
from ._version import __version__
from .layout import FlatLayout, ParamSlot
from .posterior import L2MPosterior, SampleBatch

__all__ = ["L2MPosterior", "SampleBatch", "FlatLayout", "ParamSlot", "ops", "__version__"]
