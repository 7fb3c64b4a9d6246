"""Tests for captune.meteor: the filtered paraphrase table gives pycocoevalcap's METEOR numbers exactly, keeps the
entries the sentences can use, and every way it can fail falls back to the full table or names the failure.

tests/test_metrics.py also compares the whole scoring (METEOR included) with COCOEvalCap on 300 generated images.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gzip
import re
from pathlib import Path

import pytest
from pycocoevalcap.meteor.meteor import Meteor

from captune import meteor
from captune.errors import CaptuneError
from captune.meteor import meteor_score, paraphrase_index

# Tokenized as PTBTokenizer leaves them, plus what it lets through and Meteor's -norm splits again: hyphens, entities,
# contractions, numbers with separators, initials, non-ASCII letters, upper case (from callers that skip the tokenizer).
GTS = {
    "1": ["a man in a t-shirt is riding a bike down the street", "a person rides a bicycle on the road"],
    "2": ["two dogs are playing in the snow", "a couple of puppies play outside in the snow"],
    "3": ["the u.s. flag flies over 5,000 people", "a large crowd of people under an american flag"],
    "4": ["a woman does n't like the café 's coffee &amp; tea", "a lady is drinking a cup of coffee"],
    "5": ["children are sitting at a table eating lunch", "kids eat their meal at the dining table"],
}
RES = {
    "1": ["a guy in a shirt rides his bicycle along the road"],
    "2": ["a pair of dogs playing in snow"],
    "3": ["many people stand beneath the US flag"],
    "4": ["a woman who dislikes coffee and tea"],
    "5": ["several kids having their lunch at the table"],
}


@pytest.fixture(scope="module")
def official() -> tuple[float, list[float]]:
    scorer = Meteor()
    try:
        score, scores = scorer.compute_score(GTS, RES)
    finally:
        scorer.meteor_p.kill()
    return score, list(scores)


def test_scores_equal_pycocoevalcap_with_the_filtered_table(official: tuple[float, list[float]]) -> None:
    assert paraphrase_index() is not None  # the filtered path is the one under test
    assert meteor_score(GTS, RES) == official


def test_several_jvms_give_the_scores_of_one(
    official: tuple[float, list[float]], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(meteor, "_IMAGES_PER_JVM", 2)  # 5 images: two JVMs score 2 and 3 images
    monkeypatch.setattr(meteor, "_LINES_PER_WRITE", 2)  # and get their requests in several writes
    started: list[int] = []
    jvm = meteor._Jvm

    class CountedJvm(jvm):  # type: ignore[misc,valid-type]
        def __init__(self, *args: object) -> None:
            started.append(1)
            super().__init__(*args)

    monkeypatch.setattr(meteor, "_Jvm", CountedJvm)
    assert meteor_score(GTS, RES, jvms=4, progress=True) == official
    assert len(started) == 2
    shown = capsys.readouterr().err
    assert "METEOR: 100%" in shown and "5/5" in shown


def test_normalizer_and_filter_work_in_blocks(
    official: tuple[float, list[float]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(meteor, "_SENTENCES_PER_BLOCK", 3)
    assert meteor_score(GTS, RES) == official


def test_full_table_fallback_gives_the_same_scores(
    official: tuple[float, list[float]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAPTUNE_METEOR_FULL_TABLE", "1")
    assert meteor_score(GTS, RES) == official


def test_filtered_table_is_small_and_keeps_the_paraphrases_the_captions_use(tmp_path: Path) -> None:
    sentences = [*(c for captions in RES.values() for c in captions), *(c for refs in GTS.values() for c in refs)]
    table = meteor._filtered_table(sentences, tmp_path)
    assert table is not None
    lines = gzip.decompress(table.read_bytes()).decode().split("\n")[:-1]
    pairs = {(first, second) for first, second in zip(lines[1::3], lines[2::3], strict=True)}
    assert 0 < len(pairs) < 100_000  # of 5.3 million entries in the full table
    assert ("bicycle", "bike") in pairs and ("snow", "snow") not in pairs
    # Every entry kept has a phrase made of the sentences' words, split as Meteor's -norm may split them.
    words = {w for s in sentences for w in s.lower().split() + re.findall(r"\w+|[^\w\s]+", s.lower())}
    for first, second in pairs:
        assert set(first.split()) <= words or set(second.split()) <= words, (first, second)


def test_captions_without_table_words_score_with_an_empty_table(tmp_path: Path) -> None:
    table = meteor._filtered_table(["zzqx qqzv"], tmp_path)
    assert table is not None and gzip.decompress(table.read_bytes()) == b""
    score, scores = meteor_score({"a": ["zzqx qqzv"]}, {"a": ["zzqx qqzv"]})
    assert score == pytest.approx(scores[0]) and score > 0.9


def test_unwritable_cache_falls_back_to_the_full_table(
    official: tuple[float, list[float]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("CAPTUNE_CACHE_DIR", str(blocker / "cache"))
    assert meteor_score(GTS, RES) == official
    assert "full paraphrase table" in capsys.readouterr().err


def test_a_failing_jvm_is_an_error_quoting_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(meteor, "_COMMAND", ["java", "-jar", "no-such-meteor.jar"])
    with pytest.raises(CaptuneError, match=r"METEOR \(Java\) stopped after 0 of 5 answers: .*no-such-meteor\.jar"):
        meteor_score(GTS, RES)


def test_mismatched_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="one prediction for every referenced image"):
        meteor_score(GTS, {"1": RES["1"]})
