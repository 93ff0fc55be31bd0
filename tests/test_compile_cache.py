"""The Inductor cache in a bundle (`torch_compile_cache/`) is used only as sealed at the last clean
exit: a swapped, edited or added file, or no seal, empties it and Inductor compiles again (issue 31,
item 3). Inductor imports cached kernels by name without checking their bytes."""

from __future__ import annotations

import logging
import os

import pytest

pytest.importorskip("torch")

from ilf_deploy.engines.backends.pytorch import COMPILE_CACHE_SEAL, check_compile_cache, seal_compile_cache


def _cache(tmp_path):
    cache = tmp_path / "torch_compile_cache"
    (cache / "ab").mkdir(parents=True)
    (cache / "ab" / "cab1.py").write_text("def kernel(): return 1\n")
    (cache / "ab" / "cab2.py").write_text("def kernel(): return 2\n")
    seal_compile_cache(cache)
    return cache


def test_a_sealed_cache_is_kept(tmp_path, caplog):
    cache = _cache(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ilf_deploy.torch"):
        assert check_compile_cache(cache)
    assert (cache / "ab" / "cab1.py").is_file() and not caplog.text


@pytest.mark.parametrize("change", ["swap", "edit", "add", "unsealed"])
def test_a_cache_that_is_not_as_sealed_is_emptied(tmp_path, caplog, change):
    cache = _cache(tmp_path)
    one, two = cache / "ab" / "cab1.py", cache / "ab" / "cab2.py"
    if change == "swap":  # two kernels with the same signature, renamed into each other's place
        text = one.read_text()
        one.write_text(two.read_text())
        two.write_text(text)
    elif change == "edit":
        one.write_text("def kernel(): return 3\n")
    elif change == "add":
        (cache / "ab" / "cab3.py").write_text("def kernel(): return 4\n")
    else:
        (cache / COMPILE_CACHE_SEAL).unlink()  # the last process did not exit cleanly
    with caplog.at_level(logging.WARNING, logger="ilf_deploy.torch"):
        assert not check_compile_cache(cache)
    assert "does not match its seal: emptied, recompiling" in caplog.text
    assert cache.is_dir() and not any(cache.iterdir())


def test_an_empty_cache_needs_no_seal(tmp_path):
    cache = tmp_path / "torch_compile_cache"
    cache.mkdir()
    assert check_compile_cache(cache)


def test_a_second_compiled_engine_in_the_same_process_keeps_the_first_ones_kernels(
    tmp_path, caplog, monkeypatch
):
    """`tune` opens torch bf16 compiled, then torch fp32 compiled: the kernels the first wrote are
    this process's own (sealed at its exit), not an unsealed leftover to empty."""
    from ilf_deploy.engines.backends.pytorch import use_compile_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unset")
    cache = tmp_path / "torch_compile_cache"  # a new bundle's: empty, no seal yet
    with caplog.at_level(logging.WARNING, logger="ilf_deploy.torch"):
        use_compile_cache(cache)
        (cache / "ab").mkdir()
        (cache / "ab" / "cab3.py").write_text("def kernel(): return 3\n")  # the first engine's compile
        use_compile_cache(cache)
    assert (cache / "ab" / "cab3.py").is_file() and not caplog.text
    assert str(cache.resolve()) == os.environ["TORCHINDUCTOR_CACHE_DIR"]
