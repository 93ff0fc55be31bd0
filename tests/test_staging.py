"""One staging mechanism (ilf_deploy.core.files): a directory or a file is written aside under a hidden
name and renamed into place only when complete; a failure leaves the destination as it was; what a
killed writer (kill -9) left is removed by the next writer, never a live writer's."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ilf_deploy.core import files
from ilf_deploy.core.files import (
    UNLOCKED_FILE_GRACE_S,
    DestinationExists,
    atomic_file,
    remove_dead_staging,
    staged_directory,
    sweep_staged,
    write_atomic,
)

PACKAGE = Path(files.__file__).parents[1]  # ilf_deploy


def write_tree(directory: Path, text: str) -> None:
    (directory / "sub").mkdir()
    (directory / "sub" / "file.txt").write_text(text)


def tree(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): p.read_text() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_staged_directory_is_renamed_into_place_when_complete(tmp_path):
    dest = tmp_path / "model"
    with staged_directory(dest) as staged:
        assert staged.parent == tmp_path and staged.name.startswith(".model.tmp-")  # hidden, beside it
        assert not dest.exists()
        write_tree(staged, "new")
    assert tree(dest) == {"sub/file.txt": "new"}
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no lock, no staging left
    assert dest.stat().st_mode & 0o777 == 0o777 & ~files._umask()  # not mkdtemp's 0700


def test_an_empty_destination_directory_is_taken(tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    with staged_directory(dest) as staged:
        write_tree(staged, "new")
    assert tree(dest) == {"sub/file.txt": "new"}


@pytest.mark.parametrize("interrupt", [RuntimeError("the export failed"), KeyboardInterrupt()])
def test_a_failure_leaves_no_partial_directory_and_the_old_destination(tmp_path, interrupt):
    dest = tmp_path / "model"
    dest.mkdir()
    write_tree(dest, "old")
    with pytest.raises(type(interrupt)), staged_directory(dest, replace=True) as staged:
        write_tree(staged, "new")
        raise interrupt
    assert tree(dest) == {"sub/file.txt": "old"}
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_an_existing_destination_is_replaced_only_when_asked(tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    write_tree(dest, "old")
    with pytest.raises(DestinationExists), staged_directory(dest) as staged:
        write_tree(staged, "new")
    assert tree(dest) == {"sub/file.txt": "old"} and sorted(os.listdir(tmp_path)) == ["model"]

    keep = staged_directory(dest, replace=lambda there: not (there / "sub").is_dir())  # it decides
    with pytest.raises(DestinationExists), keep as staged:
        write_tree(staged, "new")
    assert tree(dest) == {"sub/file.txt": "old"}

    seen = []
    with staged_directory(dest, replace=lambda there: seen.append(there) or True) as staged:
        write_tree(staged, "new")
    assert seen == [dest] and tree(dest) == {"sub/file.txt": "new"}
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no .model.old left


def test_a_file_or_link_in_the_way_is_replaced_when_asked(tmp_path):
    for make in (lambda p: p.write_text("a file"), lambda p: p.symlink_to(tmp_path)):
        dest = tmp_path / "model"
        make(dest)
        with staged_directory(dest, replace=True) as staged:
            write_tree(staged, "new")
        assert dest.is_dir() and not dest.is_symlink() and tree(dest) == {"sub/file.txt": "new"}
        assert sorted(os.listdir(tmp_path)) == ["model"]
        files.remove_path(dest)


def test_the_previous_destination_stays_when_the_final_rename_fails(tmp_path, monkeypatch):
    dest = tmp_path / "model"
    dest.mkdir()
    write_tree(dest, "old")
    real = os.rename

    def rename(src, dst):
        if (
            Path(src).name.startswith(".model.tmp-")
            and not Path(dst).exists()
            and (tmp_path / ".model.old").exists()
        ):
            raise OSError(28, "No space left on device")  # after `dest` was moved aside
        return real(src, dst)

    monkeypatch.setattr(files.os, "rename", rename)
    with pytest.raises(OSError, match="No space"), staged_directory(dest, replace=True) as staged:
        write_tree(staged, "new")
    assert tree(dest) == {"sub/file.txt": "old"}
    assert sorted(os.listdir(tmp_path)) == ["model"]


# -- what a kill -9 leaves ------------------------------------------------------------------------

HOLD_DIRECTORY = (
    "import sys, time\nfrom pathlib import Path\nfrom ilf_deploy.core.files import staged_directory\n"
    "with staged_directory(Path(sys.argv[1])) as tmp:\n"
    "    (tmp / 'half').write_text('x')\n    print(tmp, flush=True)\n    time.sleep(600)\n"
)
HOLD_FILE = (
    "import sys, time\nfrom pathlib import Path\nfrom ilf_deploy.core.files import atomic_file\n"
    "with atomic_file(Path(sys.argv[1])) as tmp:\n"
    "    tmp.write_bytes(b'half')\n    print(tmp, flush=True)\n    time.sleep(600)\n"
)

WRITE = (
    "import sys, pathlib\nfrom ilf_deploy.core.files import write_atomic\n"
    "write_atomic(pathlib.Path(sys.argv[1]), b'{}')\n"
)


def hold(code: str, path: Path) -> tuple[subprocess.Popen, Path]:
    """Another writer in the middle of writing `path`: it holds its staging until killed."""
    process = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return process, Path(process.stdout.readline().strip())


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    assert process.stdout is not None
    process.stdout.close()


def test_a_killed_writers_staging_directory_is_swept_by_the_next_writer(tmp_path):
    dest = tmp_path / "model"
    process, staged = hold(HOLD_DIRECTORY, dest)
    try:
        assert staged.is_dir() and (tmp_path / f"{staged.name}.lock").is_file()
        assert sweep_staged(dest) == [] and staged.is_dir()  # a live writer's is kept
    finally:
        kill(process)
    assert staged.is_dir()  # what the kill left
    with staged_directory(dest) as mine:
        assert not staged.exists() and not (tmp_path / f"{staged.name}.lock").exists()
        write_tree(mine, "new")
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_a_replacing_writer_killed_between_its_renames_gives_the_old_destination_back(tmp_path):
    dest = tmp_path / "model"
    old = tmp_path / ".model.old"
    old.mkdir()  # the state between the two renames: the previous `dest` moved aside, no `dest`
    write_tree(old, "old")
    (tmp_path / ".model.tmp-killed").mkdir()  # the new one, whose writer is dead:
    (tmp_path / ".model.tmp-killed.lock").write_text("pid 1\n")  # nobody holds its lock
    assert [p.name for p in sweep_staged(dest)] == [".model.tmp-killed"]
    assert tree(dest) == {"sub/file.txt": "old"} and sorted(os.listdir(tmp_path)) == ["model"]


def test_a_killed_writers_staged_file_is_swept_by_the_next_write(tmp_path):
    target = tmp_path / "manifest.json"
    process, staged = hold(HOLD_FILE, target)
    try:
        assert re.fullmatch(r"\.manifest\.json\.tmp-\w+\.part", staged.name), staged.name
        old = time.time() - UNLOCKED_FILE_GRACE_S - 60
        os.utime(staged, (old, old))
        assert remove_dead_staging(tmp_path) == ([], False) and staged.is_file()  # locked: alive
    finally:
        kill(process)
    young = tmp_path / ".other.json.tmp-young.part"  # unlocked, but made an instant ago
    young.write_text("x")
    # the next write, by a new process (this one sweeps each directory once)
    subprocess.run([sys.executable, "-c", WRITE, str(target)], check=True)
    assert sorted(os.listdir(tmp_path)) == [young.name, "manifest.json"]
    assert target.read_bytes() == b"{}"


def test_atomic_file_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "state.pt"
    write_atomic(target, b"old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-save")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["state.pt"]
    assert target.stat().st_mode & 0o777 == 0o644


# -- one mechanism --------------------------------------------------------------------------------

RENAMES = re.compile(r"os\.rename\(|os\.replace\(|\.rename\(|mkdtemp\(|mkstemp\(")


def test_every_writer_stages_through_files_py():
    """Renames into place and temp dirs beside a destination happen in core/files.py (and rewrite_manifest,
    which renames a bundle's staged files in just before its manifest)."""
    allowed = {PACKAGE / "core" / "files.py": None, PACKAGE / "core" / "runtime" / "bundle.py": 1}
    found: dict[Path, int] = {}
    for path in PACKAGE.rglob("*.py"):
        count = len(RENAMES.findall(path.read_text()))
        if count and path not in allowed:
            found[path.relative_to(PACKAGE)] = count
    assert found == {}
    assert len(RENAMES.findall((PACKAGE / "core" / "runtime" / "bundle.py").read_text())) == 1


def test_a_tiny_model_replaced_with_force_is_swapped_whole(tmp_path, monkeypatch):
    """make_tiny_pipeline(force=True) stages beside the old model and swaps it only when complete."""
    from ilf_deploy.model import tiny

    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("old")

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    real = tiny._save_tokenizers
    monkeypatch.setattr(tiny, "_save_tokenizers", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        tiny.make_tiny_pipeline("dit", out, num_layers=1, force=True)
    assert sorted(os.listdir(out)) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["model"]

    monkeypatch.setattr(tiny, "_save_tokenizers", real)
    tiny.make_tiny_pipeline("dit", out, num_layers=1, force=True)
    assert (out / "model_index.json").is_file() and not (out / "keep.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_a_shipped_bundle_is_written_once_per_node_and_a_damaged_copy_replaced(
    tiny_bundles, tmp_path, monkeypatch
):
    """Shipped.materialize (Ray's object store stood in for by the bytes themselves): workers of one
    node racing write one copy (the losers use the winner's), and a damaged copy is replaced whole."""
    import threading
    import types

    from ilf_deploy.core.runtime.bundle import Bundle
    from ilf_deploy.serving.scale.ship import CACHE_ENV, Shipped, bundle_files

    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(get=lambda ref: ref))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    bundle = Bundle.load(tiny_bundles["dit"])
    shipped = Shipped(
        "b", bundle.digest, tuple((n, (bundle.path / n).read_bytes()) for n in bundle_files(bundle))
    )
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(shipped.materialize())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    final = tmp_path / "cache" / bundle.digest.removeprefix("sha256:")
    assert results == [final / "b"] * 4 and os.listdir(tmp_path / "cache") == [final.name]
    assert Bundle.load(final / "b", digest=bundle.digest)

    (final / "b" / "manifest.sha256").write_text("sha256:" + "0" * 64 + "\n")  # damaged
    assert shipped.materialize() == final / "b"
    assert Bundle.load(final / "b", digest=bundle.digest) and os.listdir(tmp_path / "cache") == [final.name]
