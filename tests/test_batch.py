"""`ilf-deploy batch` on this machine (no Ray): rows, error rows, `generate`'s images, resuming.

The same command on a Ray cluster is tests/test_ray.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ilf_deploy.build.export.build import BuildOptions, build_bundle
from ilf_deploy.cli import app
from ilf_deploy.core.errors import ConfigError
from ilf_deploy.model.tiny import make_tiny_pipeline
from ilf_deploy.serving.scale.rows import Results

runner = CliRunner()
PROMPT = "a small red circle on a blue background"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("batch")
    model = make_tiny_pipeline("pixart-alpha", root / "model", num_layers=4)
    options = BuildOptions(plans=("base-2", "ilf-4"), resolutions=((32, 32), (64, 64)), copy_model=False)
    return build_bundle(model, root / "bundle", options)


# Request lines and what each one becomes: None = an image, else the error row's message. Blank
# lines are no requests (line 3). The messages are the request contract's, as in serve's 400.
LINES = [
    ({"prompt": PROMPT, "seed": 1}, None),
    ({"prompt": "a big green square", "seed": 2, "plan": "base-2", "guidance_scale": 1.0}, None),
    ({"prompt": PROMPT, "seed": -1}, "seed must be >= 0, got -1"),
    ("", None),
    ({"prompt": PROMPT, "size": "64x64", "negative_prompt": "blue", "seed": 3}, None),
    ({"prompt": PROMPT, "plan": "nope"}, "unknown plan 'nope'; this bundle has: base-2, ilf-4"),
    ("not json", "the line is not valid JSON"),
    ({"prompt": PROMPT, "n": 2}, "n must be in 1..1, got 2"),
    ({"prompt": PROMPT, "steps": 3}, "unknown parameter 'steps'"),
    ([1, 2], "the line must be a JSON object (a request's fields)"),
    ({"prompt": PROMPT}, None),  # no seed: 0, as `generate`
]


def write_prompts(path: Path, lines=LINES) -> Path:
    text = [line if isinstance(line, str) else json.dumps(line) for line, _ in lines]
    path.write_text("\n".join(text) + "\n")
    return path


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def generate_png(bundle: Path, out: Path, fields: dict) -> bytes:
    """What `ilf-deploy generate` writes for the same fields."""
    args = ["generate", bundle, "--plan", fields.get("plan", "ilf-4"), "--prompt", fields["prompt"]]
    args += ["--seed", fields.get("seed", 0), "--out", out]
    if "size" in fields:
        width, height = fields["size"].split("x")
        args += ["--width", width, "--height", height]
    for name in ("guidance_scale", "negative_prompt"):
        if name in fields:
            args += ["--" + name.replace("_", "-"), fields[name]]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return out.read_bytes()


def test_every_line_gets_one_row_and_images_are_generates(bundle, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    started = time.time()
    result = invoke("batch", bundle, "--prompts", prompts, "--out", out)
    assert result.exit_code == 0, result.output
    assert "10 rows: 4 images, 6 refused, 0 failed" in result.output
    rows = {row["index"]: row for row in read_rows(out)}
    assert sorted(rows) == [i for i, (line, _) in enumerate(LINES) if line != ""]
    for index, (fields, error) in enumerate(LINES):
        if fields == "":
            continue
        row = rows[index]
        assert list(row) == ["index", "request", "file", "sha256", "seconds", "finished", "worker", "error"]
        if error is not None:
            assert row["error"] == error and row["file"] is None and row["request"] is None
            continue
        png = (out / row["file"]).read_bytes()
        assert row["file"] == f"images/{index}.png" and row["sha256"] == hashlib.sha256(png).hexdigest()
        assert png == generate_png(bundle, tmp_path / f"generate-{index}.png", fields), index
        assert row["error"] is None and row["worker"]["pid"] > 0 and row["seconds"] > 0
        assert started < row["finished"] < time.time()
    assert rows[0]["request"] == {
        "plan": "ilf-4",
        "prompt": PROMPT,
        "negative_prompt": "",
        "class_label": None,
        "guidance_scale": 4.5,  # the model's default, resolved once
        "seed": 1,
        "height": 32,
        "width": 32,
    }
    assert rows[4]["request"]["height"] == 64 and rows[10]["request"]["seed"] == 0


def test_a_rerun_resumes_and_never_writes_a_row_twice(bundle, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    assert invoke("batch", bundle, "--prompts", prompts, "--out", out).exit_code == 0
    first = read_rows(out)
    results = out / "results.jsonl"
    kept = results.read_text().splitlines()[:8]  # the 6 refused lines (written first), 2 images
    results.write_text("\n".join(kept) + "\n" + '{"index": 4, "requ')  # a run killed mid-write
    result = invoke("batch", bundle, "--prompts", prompts, "--out", out)
    assert result.exit_code == 0, result.output
    assert "10 rows, 8 from an earlier run: 2 images, 0 refused" in result.output
    again = read_rows(out)
    assert again[:8] == first[:8]  # rows done are not redone; the partial line is gone
    assert sorted(r["index"] for r in again) == sorted(r["index"] for r in first)  # each once
    by_index = {r["index"]: r for r in first}
    for row in again[8:]:
        assert row["sha256"] == by_index[row["index"]]["sha256"]  # the same images
        assert (out / row["file"]).is_file()
    done = invoke("batch", bundle, "--prompts", prompts, "--out", out)
    assert done.exit_code == 0 and "0 images" in done.output and len(read_rows(out)) == len(first)


def test_a_directory_of_another_batch_is_refused(bundle, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    assert invoke("batch", bundle, "--prompts", prompts, "--out", out).exit_code == 0
    other = invoke("batch", bundle, "--prompts", prompts, "--out", out, "--plan", "base-2")
    assert other.exit_code == 2 and "holds a batch made with other inputs: plan 'ilf-4'" in other.output
    prompts.write_text(prompts.read_text() + json.dumps({"prompt": "one more"}) + "\n")
    changed = invoke("batch", bundle, "--prompts", prompts, "--out", out)
    assert changed.exit_code == 2 and "prompts 'sha256:" in changed.output
    with Results.open(out, json.loads((out / "batch.json").read_text())), pytest.raises(ConfigError):
        Results.open(out, {})  # a second writer of the same directory


def test_a_local_pool_makes_the_same_images(bundle, tmp_path, monkeypatch):
    from concurrent.futures import ProcessPoolExecutor

    from ilf_deploy.serving.scale import batch as scale_batch

    pools = []

    class Pool(ProcessPoolExecutor):  # the pool `--actors 2` starts, recorded
        def __init__(self, workers, *args, **kwargs):
            pools.append(workers)
            super().__init__(workers, *args, **kwargs)

    monkeypatch.setattr(scale_batch, "ProcessPoolExecutor", Pool)
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    alone, pooled = tmp_path / "alone", tmp_path / "pooled"
    assert invoke("batch", bundle, "--prompts", prompts, "--out", alone).exit_code == 0
    result = invoke(
        "batch", bundle, "--prompts", prompts, "--out", pooled, "--actors", "2", "--batch-size", "2"
    )
    assert result.exit_code == 0, result.output
    expected = {r["index"]: (r["sha256"], r["error"]) for r in read_rows(alone)}
    rows = read_rows(pooled)
    assert {r["index"]: (r["sha256"], r["error"]) for r in rows} == expected
    pids = {r["worker"]["pid"] for r in rows if r["worker"]}
    # made in the pool's 2 processes, not here; which one takes each task is the scheduler's choice (a
    # process that opened the bundle first may take both before the other is up)
    assert pools == [2] and os.getpid() not in pids and 1 <= len(pids) <= 2, (pools, pids)


def test_rows_per_task_defaults_to_up_to_16_while_every_actor_gets_4_tasks():
    from ilf_deploy.serving.scale.options import BatchOptions

    def rows_per_task(rows: int, actors: int = 1, batch_size: int | None = None) -> int:
        options = BatchOptions(Path("b"), Path("p"), Path("o"), actors=actors, batch_size=batch_size)
        return options.rows_per_task(rows)

    assert rows_per_task(64) == 16 and rows_per_task(10_000, actors=16) == 16  # a task's cost amortised
    assert rows_per_task(32) == 8 and rows_per_task(128, actors=2) == 16  # 4 tasks an actor, then the cap
    assert rows_per_task(16) == 4 and rows_per_task(64, actors=4) == 4  # 4 tasks an actor
    assert rows_per_task(10, actors=4) == 1 and rows_per_task(1) == 1  # few rows: one a task
    assert rows_per_task(10, actors=4, batch_size=5) == 5  # --batch-size decides when given
    jobs = [{"index": i} for i in range(7)]
    tasks = BatchOptions(Path("b"), Path("p"), Path("o"), batch_size=3).tasks(jobs)
    assert tasks == [jobs[0:3], jobs[3:6], jobs[6:7]]  # every row once, in order, the last task short
    unset = BatchOptions(Path("b"), Path("p"), Path("o"), actor_cpus=2.0)
    assert unset.with_actors(None).actors == 1  # here: one process, its engine on every core
    assert unset.with_actors(9.0).actors == 4 and unset.with_actors(1.0).actors == 1  # Ray: CPUs / 2
    assert BatchOptions(Path("b"), Path("p"), Path("o"), actors=3).with_actors(64.0).actors == 3


def test_a_progress_bar_counts_the_rows_with_an_eta(bundle, tmp_path, monkeypatch):
    import io

    from rich.console import Console

    import ilf_deploy.cli as cli_root
    from ilf_deploy.cli import batch as cli_batch

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120)
    monkeypatch.setattr(cli_batch, "console", console)
    monkeypatch.setattr(cli_root, "console", console)  # the one progress bar's
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    assert invoke("batch", bundle, "--prompts", prompts, "--out", tmp_path / "out").exit_code == 0
    shown = screen.getvalue()
    assert "batch" in shown and "4/4" in shown and "eta" in shown, shown  # the 4 images to make
    assert "10 rows: 4 images" in shown


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--actors", "0"], "--actors must be >= 1"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--ship-bundle"], "--ship-bundle is for Ray"),
        (["--plan", "nope"], "--plan: unknown plan 'nope'; this bundle has: base-2, ilf-4"),
        (["--digest", "sha256:" + "0" * 64], "not the pinned --digest"),
    ],
)
def test_bad_options_are_one_line_errors(bundle, tmp_path, args, message):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    result = invoke("batch", bundle, "--prompts", prompts, "--out", tmp_path / "out", *args)
    text = result.output.strip()
    assert result.exit_code == 2 and len(text.splitlines()) == 1 and message in text, text


def test_missing_prompts_file_is_one_line(bundle, tmp_path):
    result = invoke("batch", bundle, "--prompts", tmp_path / "none.jsonl", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "--prompts" in result.output and "cannot read it" in result.output
