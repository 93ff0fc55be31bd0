"""NVIDIA Triton Inference Server: a bundle as a model repository (`export-triton`), the server
from the nvidia-pytriton wheel (`install-triton`, `serve --server triton`) and Kubernetes manifests.

Nothing here is imported by the rest of the package: tritonclient and the server are optional
(`pip install 'ilf-deploy[triton]'`)."""
