""".npy files given on the command line (`generate --latents-in`): every problem is one line.

`np.load` trusts the header: an empty file ends in an EOFError with no message, a header that claims
terabytes allocates (or tracebacks) before it finds the file too short. Here the header is read
first and its claim checked against the file's real size before any allocation; the C++ runtime's
`read_npy` (cpp/src/tensor.cpp) refuses the same files.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ilf_deploy.core.errors import ConfigError

HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def read_npy(path: Path, what: str) -> np.ndarray:
    """The array in `path` (numeric dtypes only), or ConfigError naming `what` and the problem."""

    def refuse(why: str) -> ConfigError:
        return ConfigError(f"cannot read {what} {path}: {why}")

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            if size == 0:
                raise refuse("the file is empty")
            try:
                version = np.lib.format.read_magic(f)
                read_header = HEADER_READERS.get(version)
                if read_header is None:
                    raise ValueError(f".npy format version {version[0]}.{version[1]}")
                shape, fortran, dtype = read_header(f)  # the header only
            except (ValueError, SyntaxError, EOFError) as exc:
                why = (str(exc) or type(exc).__name__).splitlines()[0][:200]
                raise refuse(f"not a .npy file ({why})") from None
            if dtype.hasobject or dtype.kind not in "biuf":
                raise refuse(f"dtype {dtype} is not a number type")
            claimed = math.prod(shape) * dtype.itemsize
            held = size - f.tell()
            if claimed != held:
                raise refuse(f"its header claims {shape} {dtype} ({claimed} bytes) but the file holds {held}")
            data = bytearray(f.read(held))  # writable; no more than the file holds
    except OSError as exc:
        raise refuse(exc.strerror or str(exc)) from None
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
