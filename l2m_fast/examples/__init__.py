"""Runnable examples (not imported by the library)."""
