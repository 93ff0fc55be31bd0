"""A batch's files: the prompts (one JSON request per line) and its output directory.

`DIR/images/<index>.png` (written atomically, before its row), `DIR/results.jsonl` (one row per
input line, appended and fsynced as each finishes, in the order they finish) and `DIR/batch.json`
(what the rows were made from: a re-run into the same directory must name the same prompts file,
bundle, plan, backend and variant, so that rows of two different batches never mix). A re-run skips
every index that has a row; a run killed mid-write leaves at most a partial last line, which the
next run drops. A lock file keeps two runs from writing one directory at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.runtime.bundle import write_atomic

RESULTS = "results.jsonl"
IMAGES = "images"
STATE = "batch.json"
LOCK = ".lock"
# A row's fields, in this order: the request as resolved (plan, size and guidance decided), where its
# image went and what it is, how long it took and when it was done (Unix time, the worker's clock),
# which node and process made it, and why not.
ROW_FIELDS = ("index", "request", "file", "sha256", "seconds", "finished", "worker", "error")


@dataclass(frozen=True)
class Line:
    """One request line: its index (the line's number, from 0) and its fields, or why it has none."""

    index: int
    fields: dict[str, Any] | None
    error: str | None = None


def read_prompts(path: Path) -> tuple[list[Line], str]:
    """The request lines (blank lines are skipped: they are not requests) and the file's sha256."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"--prompts {path}: cannot read it ({exc.strerror or exc})") from None
    lines = []
    for index, raw in enumerate(data.split(b"\n")):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except UnicodeDecodeError:
            lines.append(Line(index, None, "the line is not valid UTF-8 text"))
            continue
        except (ValueError, RecursionError):
            lines.append(Line(index, None, "the line is not valid JSON"))
            continue
        if not isinstance(value, dict):
            lines.append(Line(index, None, "the line must be a JSON object (a request's fields)"))
            continue
        lines.append(Line(index, value))
    return lines, f"sha256:{hashlib.sha256(data).hexdigest()}"


def row(index: int, **values: Any) -> dict[str, Any]:
    """A results.jsonl row with every field present (null where it does not apply)."""
    unknown = set(values) - set(ROW_FIELDS)
    assert not unknown, unknown
    return {"index": index, **{name: values.get(name) for name in ROW_FIELDS[1:]}}


def image_name(index: int) -> str:
    return f"{IMAGES}/{index}.png"


@dataclass
class Results:
    """The output directory, open for appending rows. Use `Results.open`, then `close`."""

    out: Path
    done: set[int] = field(default_factory=set)
    _file: IO[str] | None = None
    _lock: IO[str] | None = None

    @classmethod
    def open(cls, out: Path, identity: dict[str, Any]) -> Results:
        """Lock `out`, check that it holds this batch (or nothing), and read the rows it has."""
        if out.is_dir() and not (out / STATE).exists():
            others = sorted(p.name for p in out.iterdir() if p.name not in (IMAGES, RESULTS, LOCK))
            if others:  # never write a batch into a directory that holds something else
                raise ConfigError(
                    f"{out} holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''} and no "
                    f"{STATE}: it is not a batch directory; choose a new or empty --out"
                )
        out.mkdir(parents=True, exist_ok=True)
        (out / IMAGES).mkdir(exist_ok=True)
        results = cls(out)
        results._lock = _lock(out)
        try:
            _check_identity(out, identity)
            results.done = _read_rows(out / RESULTS)
            results._file = (out / RESULTS).open("a", encoding="utf-8")
        except BaseException:
            results.close()
            raise
        return results

    def write(self, values: dict[str, Any], png: bytes | None = None) -> bool:
        """Write one row (its image first); False, and nothing written, if the index has one."""
        assert self._file is not None, "Results.open first"
        index = values["index"]
        if index in self.done:
            return False
        if png is not None:
            write_atomic(self.out / image_name(index), png)
        self._file.write(json.dumps(values, allow_nan=False, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done.add(index)
        return True

    def __enter__(self) -> Results:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for handle in (self._file, self._lock):
            if handle is not None:
                handle.close()
        self._file = self._lock = None


def _lock(out: Path) -> IO[str]:
    handle = (out / LOCK).open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(f"another `ilf-deploy batch` is writing {out}") from None
    return handle


def _check_identity(out: Path, identity: dict[str, Any]) -> None:
    """batch.json: written on the first run, compared on every later one."""
    path = out / STATE
    if not path.is_file():
        write_atomic(path, (json.dumps(identity, indent=2) + "\n").encode())
        return
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc}); remove {out} or choose another --out") from None
    changed = [key for key in identity if recorded.get(key) != identity[key]]
    if changed:
        said = ", ".join(f"{key} {recorded.get(key)!r} (now {identity[key]!r})" for key in changed)
        raise ConfigError(f"{out} holds a batch made with other inputs: {said}; choose another --out")


def _read_rows(path: Path) -> set[int]:
    """The indices that have a row. A partial last line (a run killed mid-write) is cut off."""
    if not path.is_file():
        return set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with path.open("r+b") as f:
            f.truncate(end)
    done: set[int] = set()
    for number, line in enumerate(data[:end].splitlines(), 1):
        try:
            index = json.loads(line)["index"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{path}:{number} is not a results row; the file was edited") from None
        if index in done:
            raise ConfigError(f"{path}:{number} repeats index {index}; the file was edited")
        done.add(index)
    return done
