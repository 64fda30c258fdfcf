"""Measurement: accuracy (eval), label-free calibration, diagnostics."""
