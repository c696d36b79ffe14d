"""Baselines of the paper's Figure 1, each a small faithful version of its method (one module each).

The demo uses these; the core library never imports them.

* :mod:`.rpf` randomized prior functions (Osband et al. 2018)
* :mod:`.mc_dropout` MC dropout (Gal & Ghahramani 2016)
* :mod:`.ensemble` deep ensembles (Lakshminarayanan et al. 2017)
* :mod:`.swag` SWAG-diagonal (Maddox et al. 2019)
* :mod:`.hmc` Hamiltonian Monte Carlo (Neal 2011; Cobb & Jalaian 2020)
"""

from ..common import MethodRun

__all__ = ["MethodRun"]
