"""Beyond one machine: offline batches (`ilf-deploy batch`, locally or on Ray actors), serving on Ray
Serve (`serve --server ray`) and the KubeRay manifests that run both on Kubernetes.

Ray (the `ray` extra) is imported only by the modules that need it (`ray_batch`, `ship`, `serve`),
so a local batch runs without it. docs/scale.md ("Beyond one machine").
"""

from __future__ import annotations

from ilf_deploy.core.errors import ConfigError


def require_ray():
    """The `ray` module, or a one-line error naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("this needs Ray: pip install 'ilf-deploy[ray]'") from None
    return ray
