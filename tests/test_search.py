"""captune.search: bulk indexing (resume, bad images), exact text -> image and image -> text search against the
model's own similarity, image -> image, the model check, and caption files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from captune.data.images import processed_pixels
from captune.data.synthetic import SyntheticSpec, generate_synthetic
from captune.errors import CaptuneError
from captune.retrieval import (
    RetrievalModel,
    build_tiny_retrieval,
    image_embeddings,
    load_retrieval,
    similarity,
    text_embeddings,
)
from captune.search import SKIPPED_FILE, SearchIndex, index_captions, index_images, read_captions
from captune.vector_index import BuildOptions, VectorIndex

MODEL_ID = "tiny-retrieval"


@pytest.fixture(scope="module")
def loaded() -> RetrievalModel:
    return build_tiny_retrieval()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[str]]:
    """12 synthetic images and their first captions."""
    folder = tmp_path_factory.mktemp("synthetic")
    manifest = json.loads(generate_synthetic(folder, SyntheticSpec(train=12, val=0, test=0, image_size=32)).read_text())
    return [folder / "images" / e["image"] for e in manifest["images"]], [e["captions"][0] for e in manifest["images"]]


def embeddings(loaded: RetrievalModel, paths: list[Path], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force: every image's query embeddings and every text's embedding, as the model gives them."""
    with torch.no_grad():
        pixels = torch.stack([processed_pixels(p, loaded.image_processor) for p in paths])
        tokens = loaded.tokenizer(texts, padding=True, return_tensors="pt")
        return image_embeddings(loaded.model, pixels), text_embeddings(loaded.model, tokens.input_ids,
                                                                       tokens.attention_mask)  # fmt: skip


@pytest.mark.parametrize("name", [MODEL_ID, "twin-blip2-itm-vit-g"])
def test_text_search_with_all_candidates_equals_brute_force_similarity(
    tmp_path: Path, loaded: RetrievalModel, images: tuple[list[Path], list[str]], name: str
) -> None:
    paths, captions = images
    if name != MODEL_ID:  # the real checkpoint's Q-Former tokenizer (BERT ids, [DEC]) and 224 px processor
        loaded = load_retrieval(name)
    index_images(paths, loaded, tmp_path / "idx", model_id=name, batch_size=5, chunk_size=4, progress=False)
    search = SearchIndex.open(tmp_path / "idx", model=loaded)
    image_embeds, text_embeds = embeddings(loaded, paths, captions[:3])
    scores = similarity(image_embeds, text_embeds)  # (images, texts)
    for t, caption in enumerate(captions[:3]):
        hits = search.search_text(caption, top=len(paths), candidates=len(paths))
        order = torch.argsort(scores[:, t], descending=True)
        if name == MODEL_ID:  # (the twin's random images score within float16 rounding of each other: no order)
            assert [h.key for h in hits] == [str(paths[i].resolve()) for i in order]
        assert {h.key for h in hits} == {str(p.resolve()) for p in paths}
        assert [h.score for h in hits] == pytest.approx(scores[order, t].tolist(), abs=2e-3)  # stored as float16


def test_image_search_finds_the_image_itself_first(
    tmp_path: Path, loaded: RetrievalModel, images: tuple[list[Path], list[str]]
) -> None:
    paths, _ = images
    index_images(paths, loaded, tmp_path / "idx", model_id=MODEL_ID, progress=False)
    hits = SearchIndex.open(tmp_path / "idx", model=loaded).search_image(paths[7], top=3)
    assert hits[0].key == str(paths[7].resolve())
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert len(hits) == 3 and hits[1].score <= hits[0].score


def test_resume_after_a_kill_stores_every_image_once(
    tmp_path: Path, loaded: RetrievalModel, images: tuple[list[Path], list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    paths, _ = images
    add = VectorIndex.add
    calls = []

    def killed_on_the_second_chunk(self: VectorIndex, *args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        add(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(VectorIndex, "add", killed_on_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        index_images(paths, loaded, tmp_path / "idx", model_id=MODEL_ID, chunk_size=4, progress=False)
    monkeypatch.setattr(VectorIndex, "add", add)
    (tmp_path / "idx" / "chunks" / ".000001.npz.tmp").write_bytes(b"PK\x03\x04 half a chunk")  # killed mid-write
    assert VectorIndex.open(tmp_path / "idx").count == 4

    summary = index_images(paths, loaded, tmp_path / "idx", model_id=MODEL_ID, chunk_size=4, progress=False)
    assert (summary.already, summary.indexed, summary.count) == (4, 8, 12)
    assert sorted(VectorIndex.open(tmp_path / "idx").keys) == sorted(str(p.resolve()) for p in paths)
    assert SearchIndex.open(tmp_path / "idx", model=loaded).search_image(paths[9], top=1)[0].key == str(
        paths[9].resolve()
    )


def test_corrupt_image_is_counted_and_listed(
    tmp_path: Path, loaded: RetrievalModel, images: tuple[list[Path], list[str]]
) -> None:
    paths, _ = images
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    summary = index_images([*paths[:3], bad], loaded, tmp_path / "idx", model_id=MODEL_ID, progress=False)
    assert (summary.indexed, summary.count) == (3, 3)
    assert [path for path, _ in summary.skipped] == [str(bad.resolve())]
    assert "1 input(s) skipped" in summary.line()
    listed = (tmp_path / "idx" / SKIPPED_FILE).read_text()
    assert listed.startswith(f"{bad.resolve()}\t") and "bad.png" in summary.skipped[0][1]


def test_another_model_is_refused(tmp_path: Path, loaded: RetrievalModel, images: tuple[list[Path], list[str]]) -> None:
    paths, _ = images
    index_images(paths[:2], loaded, tmp_path / "idx", model_id=MODEL_ID, progress=False)
    with pytest.raises(CaptuneError, match="fingerprint .* not comparable"):
        SearchIndex.open(tmp_path / "idx", model=build_tiny_retrieval(seed=1))


def test_approximate_index_above_the_threshold_reports_recall(
    tmp_path: Path, loaded: RetrievalModel, images: tuple[list[Path], list[str]]
) -> None:
    paths, _ = images
    build = BuildOptions(approximate_above=5)
    summary = index_images(paths, loaded, tmp_path / "idx", model_id=MODEL_ID, build=build, progress=False)
    assert summary.index_kind == "hnsw"
    assert summary.recall_at_10 == pytest.approx(1.0)  # 12 vectors: HNSW visits them all


def test_caption_index_image_to_text_equals_brute_force(
    tmp_path: Path, loaded: RetrievalModel, images: tuple[list[Path], list[str]]
) -> None:
    paths, captions = images
    distinct = list(dict.fromkeys(captions))
    pairs = [(f"c{i}", caption) for i, caption in enumerate(distinct)]
    summary = index_captions(pairs, loaded, tmp_path / "caps", model_id=MODEL_ID, chunk_size=5, progress=False)
    assert (summary.kind, summary.count) == ("captions", len(distinct))
    search = SearchIndex.open(tmp_path / "caps", model=loaded)
    image_embeds, text_embeds = embeddings(loaded, paths[:2], distinct)
    scores = similarity(image_embeds, text_embeds)
    for i in range(2):
        hits = search.search_image(paths[i], top=4)
        order = torch.argsort(scores[i], descending=True)[:4]
        assert [h.key for h in hits] == [f"c{int(j)}" for j in order]
        assert [h.score for h in hits] == pytest.approx(scores[i, order].tolist(), abs=1e-5)
        assert search.caption(hits[0].key) == distinct[int(order[0])]


def test_rerank_adds_the_match_probability_to_the_best_hits(
    tmp_path: Path, loaded: RetrievalModel, images: tuple[list[Path], list[str]]
) -> None:
    paths, captions = images
    index_images(paths, loaded, tmp_path / "idx", model_id=MODEL_ID, progress=False)
    search = SearchIndex.open(tmp_path / "idx", model=loaded)
    plain = {h.key: h.score for h in search.search_text(captions[0], top=12)}
    reranked = search.search_text(captions[0], top=12, rerank=3)
    boosts = [h.score - plain[h.key] for h in reranked[:3]]
    assert all(0 < b < 1 for b in boosts)  # a probability of a match added
    assert [h.score for h in reranked[:3]] == sorted((h.score for h in reranked[:3]), reverse=True)
    assert {h.key: h.score for h in reranked[3:]} == {k: plain[k] for k in [h.key for h in reranked[3:]]}


def test_image_query_against_an_images_index_refuses_rerank(
    tmp_path: Path, loaded: RetrievalModel, images: tuple[list[Path], list[str]]
) -> None:
    paths, _ = images
    index_images(paths[:2], loaded, tmp_path / "idx", model_id=MODEL_ID, progress=False)
    with pytest.raises(CaptuneError, match="leave --rerank out"):
        SearchIndex.open(tmp_path / "idx", model=loaded).search_image(paths[0], rerank=2)


def test_read_captions_text_jsonl_and_csv(tmp_path: Path) -> None:
    text = tmp_path / "c.txt"
    text.write_text("a red square\n\na blue circle\n")
    assert read_captions(text).captions == [("1", "a red square"), ("3", "a blue circle")]
    assert read_captions(text).blank_lines == [2]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"id": "x", "caption": "a red square"}\n{"caption": "a blue circle"}\n')
    assert read_captions(jsonl).captions == [("x", "a red square"), ("2", "a blue circle")]
    table = tmp_path / "c.csv"
    table.write_text('id,caption\nk1,"a red, square"\nk2,a blue circle\n')
    assert read_captions(table).captions == [("k1", "a red, square"), ("k2", "a blue circle")]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("c.jsonl", '{"caption": "a"}\n{"text": "b"}\n', r"c.jsonl:2: not a JSON object"),
        ("c.csv", "id,caption\nk,a\nk,b\n", r"c.csv:3: id 'k' is repeated"),
        ("c.csv", "id,text\nk,a\n", r"no `caption` column"),
    ],
)
def test_read_captions_names_the_bad_line(tmp_path: Path, name: str, content: str, message: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(CaptuneError, match=message):
        read_captions(tmp_path / name)


def test_pooled_vectors_are_the_normalised_mean_of_the_stored_queries(
    tmp_path: Path, loaded: RetrievalModel, images: tuple[list[Path], list[str]]
) -> None:
    paths, _ = images
    index_images(paths[:3], loaded, tmp_path / "idx", model_id=MODEL_ID, progress=False)
    index = VectorIndex.open(tmp_path / "idx")
    queries = index.queries([2, 0])
    mean = queries.mean(axis=1)
    expected = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    np.testing.assert_allclose(index.vectors(np.array([0, 2]))[[1, 0]], expected, atol=2e-3)


def test_text_query_against_a_caption_index_finds_the_caption_itself(
    tmp_path: Path, loaded: RetrievalModel, images: tuple[list[Path], list[str]]
) -> None:
    _, captions = images
    distinct = list(dict.fromkeys(captions))
    index_captions(
        [(str(i), c) for i, c in enumerate(distinct)], loaded, tmp_path / "caps", model_id=MODEL_ID, progress=False
    )
    hits = SearchIndex.open(tmp_path / "caps", model=loaded).search_text(distinct[3], top=2)
    assert (hits[0].key, hits[0].score) == ("3", pytest.approx(1.0, abs=1e-5))


def test_a_moved_model_directory_is_named(
    tmp_path: Path, loaded: RetrievalModel, images: tuple[list[Path], list[str]]
) -> None:
    paths, _ = images
    gone = str(tmp_path / "moved-model")
    index_images(paths[:2], loaded, tmp_path / "idx", model_id=gone, progress=False)
    with pytest.raises(CaptuneError, match="moved-model, which is not there any more; give its new place"):
        SearchIndex.open(tmp_path / "idx")


def test_workers_decoding_shares_of_a_batch_store_every_image_s_own_embeddings(
    tmp_path: Path, loaded: RetrievalModel, images: tuple[list[Path], list[str]]
) -> None:
    # Two workers each decode a share of a batch of 5 (3 images); the shares are joined into batches again, and a
    # corrupt file among them is skipped without moving any other image's embeddings to another key.
    paths, _ = images
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really")
    inputs = [*paths[:4], bad, *paths[4:9]]
    summary = index_images(inputs, loaded, tmp_path / "idx", model_id=MODEL_ID, batch_size=5, workers=2,
                           chunk_size=4, progress=False)  # fmt: skip
    assert (summary.indexed, [p for p, _ in summary.skipped]) == (9, [str(bad.resolve())])
    index = VectorIndex.open(tmp_path / "idx")
    good = [*paths[:4], *paths[4:9]]
    assert index.keys == [str(p.resolve()) for p in good]
    expected, _ = embeddings(loaded, good, ["a"])
    np.testing.assert_allclose(index.queries(list(range(9))), expected.numpy(), atol=1e-3)  # stored as float16
