"""Sampling operators: the reference, the registered op and its device kernels; the value checks."""

from . import cpu  # registers the CPU kernel; the compiled code loads on first call
from .checks import BadValueError, check_values, copy_checked_, copy_checked_ref
from .reference import sample_diag_gaussian_ref
from .sample import OUTPUT_DTYPES, kernel_ran, sample_diag_gaussian, sample_diag_gaussian_out
from .triton_segments import sample_into_segments, sample_into_segments_ref, segment_table

__all__ = [
    "cpu",
    "sample_diag_gaussian",
    "sample_diag_gaussian_out",
    "sample_diag_gaussian_ref",
    "sample_into_segments",
    "sample_into_segments_ref",
    "segment_table",
    "OUTPUT_DTYPES",
    "kernel_ran",
    "check_values",
    "copy_checked_",
    "copy_checked_ref",
    "BadValueError",
]
