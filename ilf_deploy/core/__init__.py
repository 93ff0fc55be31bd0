"""The core: bundles and the step loop (`runtime`), plans, schedulers, the state declaration, batching
policy, errors, files. Needs no torch.
"""
