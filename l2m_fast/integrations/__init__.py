"""Drop-in fused sampling for other libraries' diagonal Gaussian posteriors (optional dependencies).

Each module turns a peer's diagonal posterior into an :class:`~l2m_fast.L2MPosterior` over the same
model, so that one call of the fused sampler draws all its samples and :meth:`~l2m_fast.L2MPosterior.predict`,
``sampled`` and ``iter_sampled`` apply unchanged:

* :mod:`l2m_fast.integrations.laplace_torch`: laplace-torch's ``DiagLaplace`` (posterior precision);
* :mod:`l2m_fast.integrations.ivon_opt`: the IVON optimizer (mean, Hessian estimate, effective sample
  size, weight decay);
* :mod:`l2m_fast.integrations.posteriors`: diagonal states of the ``posteriors`` package
  (``laplace.diag_fisher``, ``laplace.diag_ggn``, ``ekf.diag_fisher``: ``prec_diag``; ``vi.diag``:
  ``log_sd_diag``).

Nothing here is imported with :mod:`l2m_fast`; each module imports its peer only when called, and says
how to install it when it is missing (``pip install l2m_fast[peers]``).
"""

__all__: list[str] = []
