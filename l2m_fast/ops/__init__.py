"""Sampling operators: the reference, the registered op and its device kernels."""

from . import cpu  # registers the CPU kernel; the compiled code loads on first call
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
]
