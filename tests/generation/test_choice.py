"""Tests for captune.generation.choice: the path and batch size a run takes when the user leaves them to captune."""

from __future__ import annotations

import dataclasses

import pytest

from captune.config import GenerateConfig
from captune.generation import choice
from captune.generation.choice import Facts, choose

GIB = 2**30
GPU = Facts(device_type="cuda", covered=True, free_bytes=120 * GIB, bytes_per_row=20 * 2**20)
AUTO = GenerateConfig(num_beams=1, static_cache=None, batch_size=None)


def test_cpu_takes_the_plain_path_at_the_cpu_batch() -> None:
    cpu = dataclasses.replace(GPU, device_type="cpu", free_bytes=None)
    picked = choose(AUTO, cpu, images=50_000)
    assert (picked.options.static_cache, picked.options.batch_size) == (False, choice.CPU_BATCH)
    assert "transformers generate (on cpu" in picked.line


def test_a_long_gpu_run_takes_the_static_loops_at_their_batch() -> None:
    picked = choose(AUTO, GPU, images=20_000)
    assert (picked.options.static_cache, picked.options.batch_size) == (True, 512)
    assert picked.line.startswith("captioning: static loops (20000 images, from 1000")


def test_a_short_gpu_run_takes_the_plain_path() -> None:
    picked = choose(AUTO, GPU, images=500)
    assert (picked.options.static_cache, picked.options.batch_size) == (False, 256)
    assert "transformers generate" in picked.line


def test_a_short_beam_run_takes_the_plain_path_unless_compiled_code_is_on_disk() -> None:
    beams = dataclasses.replace(AUTO, num_beams=5)
    assert choose(beams, GPU, images=1_000).options.static_cache is False
    warm = dataclasses.replace(GPU, compiled=frozenset({128}))
    picked = choose(beams, warm, images=1_000)
    assert picked.options.static_cache is True
    assert "compiled code on disk" in picked.line
    other_batch = dataclasses.replace(GPU, compiled=frozenset({64}))  # compiled at another shape: cold again
    assert choose(beams, other_batch, images=1_000).options.static_cache is False


def test_beams_take_smaller_batches() -> None:
    beams = dataclasses.replace(AUTO, num_beams=5)
    picked = choose(beams, GPU, images=8_000)
    assert (picked.options.static_cache, picked.options.batch_size) == (True, 128)
    assert choose(beams, GPU, images=2_000).options.batch_size == 64  # plain generate, beams


def test_models_the_static_loops_do_not_cover_take_the_plain_path() -> None:
    uncovered = dataclasses.replace(GPU, covered=False)
    picked = choose(AUTO, uncovered, images=100_000)
    assert picked.options.static_cache is False
    assert picked.options.batch_size == 256
    assert "repetition penalty" in picked.line


def test_a_server_compiles_once() -> None:
    assert choose(AUTO, GPU, images=None).options.static_cache is True


def test_few_images_take_the_power_of_two_above() -> None:
    picked = choose(AUTO, dataclasses.replace(GPU, compiled=frozenset({512})), images=3_000)
    assert picked.options.batch_size == 512
    assert choose(AUTO, GPU, images=100).options.batch_size == 128
    assert choose(AUTO, GPU, images=1).options.batch_size == 1


def test_the_batch_fits_in_half_the_free_memory() -> None:
    small_gpu = dataclasses.replace(GPU, free_bytes=3 * GIB)  # a 12 GB card with the model loaded
    picked = choose(AUTO, small_gpu, images=20_000)
    # 1.5 GiB / 20 MiB a row = 76 rows -> 64
    assert picked.options.batch_size == 64
    assert "half of the 3.0 GiB free" in picked.line
    beams = dataclasses.replace(AUTO, num_beams=5)
    assert choose(beams, small_gpu, images=20_000).options.batch_size == 8  # 76 rows / 5 beams = 15 -> 8


@pytest.mark.parametrize(("static", "batch"), [(True, 7), (False, 300)])
def test_what_the_user_set_is_kept(static: bool, batch: int) -> None:
    asked = dataclasses.replace(AUTO, static_cache=static, batch_size=batch)
    picked = choose(asked, dataclasses.replace(GPU, device_type="cpu"), images=10)
    assert (picked.options.static_cache, picked.options.batch_size) == (static, batch)
    assert "generate.static_cache set" in picked.line and "generate.batch_size set" in picked.line
