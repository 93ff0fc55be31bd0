"""Engines behind one contract (`backends`: ONNX Runtime, OpenVINO, PyTorch, TensorRT) and comparing
them (`compare`).
"""
