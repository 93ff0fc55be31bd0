"""Checking and measuring: verify, bench, tune, eval."""
