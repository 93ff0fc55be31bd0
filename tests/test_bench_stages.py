"""The peer benchmarks prepare their model and bundle one stage per child process (benchmarks/stages.py):
a stage whose output is there is skipped, a failed one ends the run with one line, each reports its
peak RSS; the bundle's model copy is hard-linked to the model directory and still verifies. Outputs
made by other code or settings are made anew (benchmarks/reuse.py)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from benchmarks import reuse, stages
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.model.tiny import TINY_IMAGE_SIZE, make_tiny_pipeline


def test_each_stage_runs_in_a_child_with_its_peak_rss_and_is_skipped_once_done(tmp_path, capsys):
    out = tmp_path / "made"
    stage = stages.Stage("mkdir", "os:mkdir", out, out.is_dir)  # os.mkdir(Path(out)) in the child
    stages.run_stages([stage])
    assert out.is_dir()
    line = capsys.readouterr().out
    peak = re.search(r"prepare: mkdir \(.*\): done in \d+ s, peak RSS (\d+) MiB", line)
    assert peak and int(peak.group(1)) > 0, line  # a Python child's own peak, not 0

    stages.run_stages([stage])
    assert "there already" in capsys.readouterr().out


def test_a_failed_stage_ends_the_run_with_one_line(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(SystemExit, match=r"prepare: rmdir .* failed after \d+ s: exit status 1"):
        stages.run_stages([stages.Stage("rmdir", "os:rmdir", missing, lambda: False)])
    quiet = stages.Stage("fspath", "os:fspath", missing, missing.exists)  # exits 0, writes nothing
    with pytest.raises(SystemExit, match="ended without writing its output"):
        stages.run_stages([quiet])


def test_the_child_reports_its_own_peak_not_an_earlier_childs(tmp_path):
    big = tmp_path / "big"
    with big.open("wb") as f:
        f.truncate(300 << 20)  # sparse: 300 MiB to read, none on disk
    read = stages.Stage("read", "pathlib:Path.read_bytes", big, lambda: True)  # holds 300 MiB
    _, big_kib, _ = stages.run_child(read)
    _, small_kib, code = stages.run_child(stages.Stage("small", "os:fspath", big, lambda: True))
    assert code == 0 and big_kib > 300 << 10 > small_kib


def write_tiny(out: Path) -> None:
    make_tiny_pipeline("pixart-alpha", out, seed=3, num_layers=2)


@pytest.fixture
def ran(monkeypatch) -> list[str]:
    """The names of the stages run, each in this process (not in a child)."""
    names: list[str] = []

    def in_process(stage: stages.Stage) -> tuple[float, int, int]:
        names.append(stage.name)
        stages.main([stage.function, str(stage.path), json.dumps(stage.kwargs)])
        return 0.0, 1, 0

    monkeypatch.setattr(stages, "run_child", in_process)
    return names


def test_prepare_resumes_and_stores_the_model_once(tmp_path, ran):
    size = TINY_IMAGE_SIZE["pixart-alpha"]
    args = (f"{__name__}:write_tiny", {}, ["base-2"], size, ["int8-dynamic"], "base-2")
    model, bundle = stages.prepare(tmp_path / "work", *args)
    assert ran == ["model", "bundle", "quantize int8-dynamic"]  # int8-dynamic needs no calibration
    copies = sorted(p for p in (bundle / "model").rglob("*") if p.is_file())
    assert copies and all(p.samefile(model / p.relative_to(bundle / "model")) for p in copies)
    assert "int8_dynamic" in Bundle.load(bundle, verify_hashes=True).variants

    ran.clear()  # everything is there: nothing runs again
    assert stages.prepare(tmp_path / "work", *args) == (model, bundle) and ran == []

    # a copy that is no longer linked is linked again; a model file that changed is not linked
    changed = bundle / "model" / "model_index.json"
    unlinked = next(p for p in copies if p != changed)
    shutil.copyfile(unlinked, unlinked.with_name("copy"))
    unlinked.with_name("copy").replace(unlinked)
    (model / "new").write_text('{"changed": true}')
    (model / "new").replace(model / "model_index.json")  # a new file: the bundle keeps its own
    assert stages.link_model_files(bundle, model) == unlinked.stat().st_size
    assert unlinked.samefile(model / unlinked.relative_to(bundle / "model"))
    assert not changed.samefile(model / "model_index.json")
    Bundle.load(bundle, verify_hashes=True)  # its hashes still hold


def test_outputs_made_by_other_code_or_settings_are_made_anew(tmp_path, ran, monkeypatch, capsys):
    size = TINY_IMAGE_SIZE["pixart-alpha"]
    work = tmp_path / "work"
    args = (f"{__name__}:write_tiny", {}, ["base-2"], size, [], "base-2")
    stages.prepare(work, *args)
    assert ran == ["model", "bundle"]

    ran.clear()  # another resolution: the bundle anew, the model kept
    stages.prepare(work, *args[:3], size * 2, *args[4:])
    assert ran == ["bundle"] and "bundle: made with other settings; making it anew" in capsys.readouterr().out

    ran.clear()  # ilf_deploy's sources changed since: both anew
    other = {**reuse.code_fingerprint(), "ilf_deploy": "0" * 16}
    monkeypatch.setattr(reuse, "code_fingerprint", lambda: other)
    stages.prepare(work, *args)
    assert ran == ["model", "bundle"]
    assert "made by other code (ilf_deploy changed); making it anew" in capsys.readouterr().out

    ran.clear()  # a bundle from before the stamps (none beside it): anew, the model kept
    reuse.stamp_path(work / "bundle").unlink()
    stages.prepare(work, *args)
    assert ran == ["bundle"] and "made by code that kept no stamp" in capsys.readouterr().out
    ran.clear()
    stages.prepare(work, *args)
    assert ran == []


def test_the_source_digest_follows_the_sources_not_their_caches(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    first = reuse.source_digest(tmp_path)
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0cache")
    assert reuse.source_digest(tmp_path) == first
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert reuse.source_digest(tmp_path) != first
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "a.py").rename(tmp_path / "pkg" / "b.py")  # the same bytes, another module
    assert reuse.source_digest(tmp_path) != first
