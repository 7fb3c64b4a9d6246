"""The vector index: exact search against numpy, the approximate index's recall, resume after a kill, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from captune.errors import CaptuneError
from captune.vector_index import BuildOptions, VectorIndex, recall_against_exact


def random_vectors(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def filled(folder: Path, n: int = 300, d: int = 16, chunk: int = 100, seed: int = 0) -> tuple[VectorIndex, np.ndarray]:
    """An index of n random vectors keyed img-0000.jpg, ..., added in chunks, not built."""
    x = random_vectors(n, d, seed)
    index = VectorIndex.create(folder, d, "test/model")
    for start in range(0, n, chunk):
        index.add(x[start : start + chunk], [f"img-{i:04d}.jpg" for i in range(start, min(n, start + chunk))])
    return index, x


def test_exact_search_equals_numpy_top_k(tmp_path: Path) -> None:
    index, x = filled(tmp_path / "idx")
    index.build()
    queries = random_vectors(20, 16, seed=1)
    results = VectorIndex.open(tmp_path / "idx").search(queries, top=5)
    scores = unit(queries) @ unit(x).T
    for row, got in zip(scores, results, strict=True):
        best = np.argsort(-row)[:5]
        assert [k for k, _ in got] == [f"img-{i:04d}.jpg" for i in best]
        np.testing.assert_allclose([s for _, s in got], row[best], rtol=1e-5, atol=1e-6)
    manifest = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert (manifest["dimension"], manifest["count"], manifest["index_kind"]) == (16, 300, "flat")
    assert manifest["metric"] == "inner_product" and manifest["model_id"] == "test/model"


def test_top_larger_than_count_returns_all_descending(tmp_path: Path) -> None:
    index, _ = filled(tmp_path / "idx", n=7, chunk=3)
    index.build()
    (got,) = index.search(random_vectors(1, 16, seed=2)[0], top=50)
    assert sorted(k for k, _ in got) == [f"img-{i:04d}.jpg" for i in range(7)]
    assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_kind_chosen_above_threshold(tmp_path: Path, kind: str) -> None:
    index, _ = filled(tmp_path / "idx", n=500)
    index.build(BuildOptions(approximate_above=499, approximate=kind))
    manifest = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert manifest["index_kind"] == kind
    built = VectorIndex.open(tmp_path / "idx").faiss_index()
    assert type(built).__name__ == {"hnsw": "IndexHNSWFlat", "ivf": "IndexIVFFlat"}[kind]
    index.build(BuildOptions(approximate_above=500, approximate=kind))
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["index_kind"] == "flat"


def test_default_approximate_recall_at_10(tmp_path: Path) -> None:
    index, _ = filled(tmp_path / "idx", n=20_000, d=64, chunk=5_000)
    index.build(BuildOptions(approximate_above=10_000))
    assert index.manifest["index_kind"] == "hnsw"
    recall = recall_against_exact(index, random_vectors(300, 64, seed=3), k=10)
    assert 0.95 <= recall < 1.0


def test_exact_recall_is_one(tmp_path: Path) -> None:
    index, _ = filled(tmp_path / "idx")
    index.build()
    assert recall_against_exact(index, random_vectors(50, 16, seed=4), k=10) == 1.0


def test_resume_after_kill_ignores_partial_chunk(tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    _, x = filled(folder, n=200, chunk=100)
    # A kill during the third chunk's write leaves its temporary file behind.
    (folder / "chunks" / ".000002.npz.tmp").write_bytes(b"PK\x03\x04 half a chunk")
    resumed = VectorIndex.create(folder, 16, "test/model")
    wanted = [f"img-{i:04d}.jpg" for i in range(300)]
    assert resumed.count == 200 and resumed.keys == wanted[:200]
    rest = resumed.missing(wanted)
    assert rest == wanted[200:]
    resumed.add(random_vectors(100, 16, seed=5), rest)
    resumed.build()
    reopened = VectorIndex.open(folder)
    assert reopened.keys == wanted and reopened.manifest["count"] == 300
    (got,) = reopened.search(x[42], top=1)
    assert got[0][0] == "img-0042.jpg" and got[0][1] == pytest.approx(1.0, abs=1e-5)


def test_keys_with_unicode_and_commas_survive(tmp_path: Path) -> None:
    keys = ["photos/café, plage/été 1.jpg", "a dog, a cat and a 🐕", 'quote " and \\ backslash', "日本語の説明"]
    x = random_vectors(4, 8, seed=6)
    index = VectorIndex.create(tmp_path / "idx", 8, "test/model")
    index.add(x, keys)
    index.build()
    reopened = VectorIndex.open(tmp_path / "idx")
    assert reopened.keys == keys
    assert [r[0][0] for r in reopened.search(x, top=1)] == keys


def test_dimension_mismatch_refused(tmp_path: Path) -> None:
    index, _ = filled(tmp_path / "idx")
    index.build()
    with pytest.raises(CaptuneError, match=r"idx.*16-d"):
        index.search(random_vectors(2, 32, seed=7), top=3)
    with pytest.raises(CaptuneError, match="16-d"):
        index.add(random_vectors(2, 32, seed=7), ["x", "y"])
    with pytest.raises(CaptuneError, match="another folder"):
        VectorIndex.create(tmp_path / "idx", 32, "test/model")


def test_empty_index_refused(tmp_path: Path) -> None:
    index = VectorIndex.create(tmp_path / "idx", 8, "test/model")
    with pytest.raises(CaptuneError, match=r"idx.*empty"):
        index.search(random_vectors(1, 8, seed=8), top=1)
    with pytest.raises(CaptuneError, match=r"idx.*no vectors stored"):
        index.build()


def test_folder_that_is_not_an_index_refused(tmp_path: Path) -> None:
    with pytest.raises(CaptuneError, match=r"not a vector index.*captune index"):
        VectorIndex.open(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CaptuneError, match="not empty and not an index"):
        VectorIndex.create(tmp_path, 8, "test/model")


def test_top_below_one_refused(tmp_path: Path) -> None:
    index, _ = filled(tmp_path / "idx")
    index.build()
    with pytest.raises(CaptuneError, match="top=0"):
        index.search(random_vectors(1, 16, seed=9), top=0)


def test_unbuilt_or_stale_index_refused(tmp_path: Path) -> None:
    index, _ = filled(tmp_path / "idx", n=200)
    with pytest.raises(CaptuneError, match="not built yet"):
        index.search(random_vectors(1, 16, seed=10), top=1)
    index.build()
    index.add(random_vectors(1, 16, seed=10), ["late.jpg"])
    with pytest.raises(CaptuneError, match="run build again"):
        index.search(random_vectors(1, 16, seed=10), top=1)


def test_repeated_key_refused(tmp_path: Path) -> None:
    index, _ = filled(tmp_path / "idx", n=100)
    with pytest.raises(CaptuneError, match="img-0003.jpg"):
        index.add(random_vectors(1, 16, seed=11), ["img-0003.jpg"])
    with pytest.raises(CaptuneError, match="'b'"):
        index.add(random_vectors(3, 16, seed=11), ["a", "b", "b"])
