"""Parity checks: bundle segments and plans against PyTorch (`verify`), TensorRT engines against
ONNX Runtime (`verify-engines`). Precision variants are checked in ilf_deploy.build.quantization."""
