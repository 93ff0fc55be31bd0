"""Segment export to ONNX and bundle building."""
