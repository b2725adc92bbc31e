"""Calibration (reliability bins and ECE) now lives in kb.metrics with the other metrics; kept as an alias."""

from __future__ import annotations

from kb.metrics import DEFAULT_BINS, ReliabilityBin, bin_index, ece, reliability_bins

__all__ = ["DEFAULT_BINS", "ReliabilityBin", "bin_index", "ece", "reliability_bins"]
