"""Code the tests (and benchmarks) run on, not shipped in the package: a throwaway Ray cluster in a
network namespace (`ray_sandbox`), and the repair of `tensorrt-stubs` for mypy (`trt_stubs`)."""
