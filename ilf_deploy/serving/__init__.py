"""Serving: the OpenAI-style server, NVIDIA Triton, Ray and Kubernetes."""
