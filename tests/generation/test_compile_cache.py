"""Tests for captune.generation.compile_cache: torch's compile caches in captune's cache directory, and the record
of which batch sizes of a model were compiled."""

from __future__ import annotations

from pathlib import Path

import pytest

from captune.config import GenerateConfig
from captune.generation import compile_cache
from captune.model import LoadedModel


def test_compile_caches_go_to_captunes_cache_unless_the_user_chose(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAPTUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert compile_cache.use_compile_cache() == tmp_path / "cache" / "inductor"
    assert (tmp_path / "cache" / "inductor").is_dir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache.use_compile_cache() == tmp_path / "mine"


def test_compiled_batches_are_recorded_per_model_and_beams(
    tiny: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAPTUNE_CACHE_DIR", str(tmp_path))
    greedy, beams = GenerateConfig(num_beams=1), GenerateConfig(num_beams=3)
    assert compile_cache.compiled_batches(tiny.model, greedy) == frozenset()
    compile_cache.record_compiled(tiny.model, greedy, 512)
    compile_cache.record_compiled(tiny.model, greedy, 64)
    assert compile_cache.compiled_batches(tiny.model, greedy) == {64, 512}
    assert compile_cache.compiled_batches(tiny.model, beams) == frozenset()


def test_a_damaged_record_reads_as_nothing_compiled(
    tiny: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAPTUNE_CACHE_DIR", str(tmp_path))
    options = GenerateConfig(num_beams=1)
    compile_cache.record_compiled(tiny.model, options, 8)
    (record,) = (tmp_path / "compiled-v1").iterdir()
    record.write_text("{not json")
    assert compile_cache.compiled_batches(tiny.model, options) == frozenset()
