"""What this machine is, for engine choices: CPU model, instruction-set flags, cores, library versions.

`ilf-deploy tune` records `fingerprint()` in `tuning.json`; `--backend auto` uses its winner only
where the fingerprint is the same (another CPU, core count or library version may rank engines
differently). The OpenVINO backend keys its compiled-model cache on it too.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import re
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

# The flags that decide which kernels an engine picks (SIMD width, dot products, bf16, AMX).
_ISA_FLAG = re.compile(r"^(sse4_[12]|ssse3|avx\w*|fma|f16c|amx\w*|asimd\w*|sve\w*|sme\w*|neon)$")
# The engines' libraries: another version may have other kernels.
VERSIONED = ("ilf-deploy", "numpy", "onnxruntime", "openvino", "nncf", "torch")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # bf16 dot products in hardware (else engines emulate bf16)
# 8-bit dot products in hardware: without them (AVX2 only) int8 GEMMs widen through 16-bit sums,
# and int8 ran no faster than fp32 (ORT) or slower (OpenVINO) on the PixArt-XL config (docs/engines.md)
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")


@functools.cache
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""  # not Linux


def cpu_model() -> str:
    match = re.search(r"^(model name|Model|Hardware)\s*:\s*(.+)$", _cpuinfo(), re.MULTILINE)
    return match.group(2).strip() if match else (platform.processor() or platform.machine())


@functools.cache
def cpu_flags() -> tuple[str, ...]:
    """The instruction-set flags of the first CPU in /proc/cpuinfo (x86 `flags`, Arm `Features`)."""
    match = re.search(r"^(flags|Features)\s*:\s*(.+)$", _cpuinfo(), re.MULTILINE)
    return tuple(sorted(f for f in (match.group(2).split() if match else ()) if _ISA_FLAG.match(f)))


def has_any_flag(*flags: str) -> bool:
    return any(flag in cpu_flags() for flag in flags)


def cpu_has_bf16() -> bool:
    return has_any_flag(*BF16_FLAGS)


def cpu_has_int8_dot() -> bool:
    if not cpu_flags():
        return True  # no /proc/cpuinfo (not Linux): trust the engines' kernels
    return has_any_flag(*INT8_DOT_FLAGS)


def cpu_count() -> int:
    """CPUs this process may run on (a container's cgroup affinity, not the host's count)."""
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def library_versions(packages: Sequence[str] = VERSIONED) -> dict[str, str | None]:
    """Each of `packages`' installed version (None: absent)."""
    versions: dict[str, str | None] = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def fingerprint() -> dict[str, Any]:
    """This machine as `tuning.json` records it; equal fingerprints rank engines the same."""
    return {
        "cpu": cpu_model(),
        "arch": platform.machine(),
        "flags": list(cpu_flags()),
        "cores": cpu_count(),
        "versions": library_versions(),
    }


def fingerprint_difference(recorded: dict[str, Any], current: dict[str, Any]) -> str | None:
    """What differs between two fingerprints, in words (None when they match)."""
    for key in ("cpu", "arch", "flags", "cores"):
        if recorded.get(key) != current.get(key):
            return f"{key}: {_short(recorded.get(key))} there, {_short(current.get(key))} here"
    old, new = recorded.get("versions") or {}, current.get("versions") or {}
    for package in sorted(set(old) | set(new)):
        if old.get(package) != new.get(package):
            return f"{package} {old.get(package) or 'absent'} there, {new.get(package) or 'absent'} here"
    return None


def _short(value: Any) -> str:
    if isinstance(value, list):
        return f"{len(value)} flags"
    return str(value)
