"""Sampling operators: the reference, the registered op and its device kernels."""

from . import cpu  # registers the CPU kernel; the compiled code loads on first call
from .reference import sample_diag_gaussian_ref
from .sample import OUTPUT_DTYPES, sample_diag_gaussian, sample_diag_gaussian_out

__all__ = ["cpu", "sample_diag_gaussian", "sample_diag_gaussian_out", "sample_diag_gaussian_ref", "OUTPUT_DTYPES"]
