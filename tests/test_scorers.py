"""Tests for captune.scorers: the chunked scorers give pycocoevalcap's whole-corpus numbers exactly (==), in this
process and in spawned workers, and no scorer ever holds more than one chunk."""

from __future__ import annotations

import random
from typing import Any

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.bleu.bleu_scorer import BleuScorer
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer
from pycocoevalcap.rouge.rouge import Rouge

from captune import scorers
from captune.metrics import FAST_METRICS

_WORDS = "a an the man woman dog cat two people sitting standing on in at near with table street red of is".split()


def _caption(rng: random.Random) -> str:
    # Tokenized captions as PTBTokenizer returns them; now and then an empty one (an all-punctuation prediction).
    return "" if rng.random() < 0.05 else " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 30)))


@pytest.fixture(scope="module")
def corpus() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    rng = random.Random(7)
    gts = {f"img{i}": [_caption(rng) or "a dog" for _ in range(rng.randint(1, 5))] for i in range(53)}
    return gts, {image_id: [_caption(rng)] for image_id in gts}


@pytest.fixture(scope="module")
def official(corpus: tuple[dict[str, list[str]], dict[str, list[str]]]) -> dict[str, tuple[Any, Any]]:
    gts, res = corpus
    bleu, bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
    results = {f"Bleu_{n}": (bleu[n - 1], bleu_per_image[n - 1]) for n in range(1, 5)}
    rouge, rouge_per_image = Rouge().compute_score(gts, res)
    cider, cider_per_image = Cider().compute_score(gts, res)
    return results | {"ROUGE_L": (rouge, list(rouge_per_image)), "CIDEr": (cider, list(cider_per_image))}


@pytest.mark.parametrize("workers", [1, 2])
def test_chunked_scores_equal_the_whole_corpus_calls(
    corpus: tuple[dict[str, list[str]], dict[str, list[str]]],
    official: dict[str, tuple[Any, Any]],
    workers: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(scorers, "CHUNK_IMAGES", 10)  # 6 chunks, the last one short
    scores = scorers.corpus_scores(*corpus, FAST_METRICS, workers=workers)
    assert list(scores) == list(official)
    for name, (corpus_score, per_image) in official.items():
        assert scores[name][0] == corpus_score, name
        assert scores[name][1] == [float(score) for score in per_image], name


def test_no_scorer_holds_more_than_one_chunk(
    corpus: tuple[dict[str, list[str]], dict[str, list[str]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    cooked: list[int] = []

    class CountingCider(CiderScorer):  # type: ignore[misc]
        def compute_cider(self) -> list[float]:
            cooked.append(sum(1 for _ in self.crefs))
            return super().compute_cider()  # type: ignore[no-any-return]

    class CountingBleu(BleuScorer):  # type: ignore[misc]
        def compute_score(self, option: str | None = None, verbose: int = 0) -> Any:
            cooked.append(-sum(1 for refs in self.crefs if refs is not None))
            return super().compute_score(option, verbose)

    monkeypatch.setattr(scorers, "CHUNK_IMAGES", 10)
    monkeypatch.setattr(scorers, "CiderScorer", CountingCider)
    monkeypatch.setattr(scorers, "BleuScorer", CountingBleu)
    scorers.corpus_scores(*corpus, FAST_METRICS, workers=1)
    # CIDEr-D scored 6 chunks of at most 10 images; BLEU's one corpus-wide call held no cooked references.
    assert sorted(count for count in cooked if count > 0) == [3, 10, 10, 10, 10, 10]
    assert [count for count in cooked if count <= 0] == [0]


def test_only_the_asked_metrics_are_computed(
    corpus: tuple[dict[str, list[str]], dict[str, list[str]]],
    official: dict[str, tuple[Any, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_bleu(*args: object, **kwargs: object) -> None:
        raise AssertionError("BLEU was not asked for")

    monkeypatch.setattr(scorers, "BleuScorer", no_bleu)
    monkeypatch.setattr(scorers, "CHUNK_IMAGES", 10)
    scores = scorers.corpus_scores(*corpus, ("CIDEr", "METEOR"), workers=1)
    assert list(scores) == ["CIDEr"]
    assert scores["CIDEr"][0] == official["CIDEr"][0]


def test_progress_bar_counts_both_passes(
    corpus: tuple[dict[str, list[str]], dict[str, list[str]]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(scorers, "CHUNK_IMAGES", 10)
    scorers.corpus_scores(*corpus, FAST_METRICS, workers=1, progress=True)
    shown = capsys.readouterr().err
    assert "BLEU, ROUGE-L, CIDEr-D: 100%" in shown
    assert "106/106" in shown  # 53 images, two passes (CIDEr-D's document frequencies, then the scores)
