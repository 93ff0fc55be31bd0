"""Calibration trajectories and INT8/FP8 precision variants of a bundle (above runtime and backends)."""
