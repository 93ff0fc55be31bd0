"""Accelerator backends beyond ONNX Runtime (TensorRT). Each imports its SDK only when used."""
