"""Retrieval Recall@K: equal to a brute-force ranking (ties included) on generated matrices with several captions per
image, equal to LAVIS's `_report_metrics` loop where there are no ties, hand-made ties and fewer candidates than K,
the re-ranking of the top k with a fake matching head, and the errors for bad input."""

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from captune.errors import CaptuneError
from captune.retrieval_metrics import RetrievalRecall, rerank, retrieval_recall


def _brute_rank(row: list[float], is_match: list[bool]) -> int:
    """Sorts the candidates best first, a non-match before a match of equal score; the first match's place."""
    order = sorted(range(len(row)), key=lambda j: (-row[j], is_match[j]))
    return next(place for place, j in enumerate(order) if is_match[j])


def _brute_recall(scores: np.ndarray, text_image: list[int], ks: list[int]) -> dict[str, float]:
    n_images, n_texts = scores.shape
    txt_ranks = [_brute_rank(list(scores[i]), [text_image[t] == i for t in range(n_texts)]) for i in range(n_images)]
    img_ranks = [_brute_rank(list(scores[:, t]), [i == text_image[t] for i in range(n_images)]) for t in range(n_texts)]
    return _percent(txt_ranks, img_ranks, ks)


def _percent(txt_ranks: list[int], img_ranks: list[int], ks: list[int]) -> dict[str, float]:
    numbers = {f"txt_r{k}": 100.0 * sum(r < k for r in txt_ranks) / len(txt_ranks) for k in ks}
    numbers |= {f"img_r{k}": 100.0 * sum(r < k for r in img_ranks) / len(img_ranks) for k in ks}
    return numbers


def _per_k(recall: RetrievalRecall) -> dict[str, float]:
    return {key: value for key, value in recall.as_dict().items() if not key.endswith("mean")}


def _lavis_report(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img: list[int]) -> dict[str, float]:
    """LAVIS's `RetrievalTask._report_metrics` (lavis/tasks/retrieval.py), restated without its logging."""
    img2txt = [[t for t, i in enumerate(txt2img) if i == image] for image in range(scores_i2t.shape[0])]
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        ranks[index] = min(np.where(inds == i)[0][0] for i in img2txt[index])
    tr1, tr5, tr10 = (100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10))
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir1, ir5, ir10 = (100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10))
    tr_mean, ir_mean = (tr1 + tr5 + tr10) / 3, (ir1 + ir5 + ir10) / 3
    return {
        "txt_r1": tr1, "txt_r5": tr5, "txt_r10": tr10, "txt_r_mean": tr_mean,
        "img_r1": ir1, "img_r5": ir5, "img_r10": ir10, "img_r_mean": ir_mean, "r_mean": (tr_mean + ir_mean) / 2,
    }  # fmt: skip


@st.composite
def _cases(draw: st.DrawFn) -> tuple[np.ndarray, list[int], list[int]]:
    """Up to 7 images with 1-5 captions each, shuffled; scores from 5 values so that ties are common."""
    captions = draw(st.lists(st.integers(1, 5), min_size=1, max_size=7))
    text_image = draw(st.permutations([i for i, n in enumerate(captions) for _ in range(n)]))
    values = st.sampled_from([-1.0, 0.0, 0.25, 0.5, 2.0])
    scores = draw(st.lists(st.lists(values, min_size=len(text_image), max_size=len(text_image)),
                           min_size=len(captions), max_size=len(captions)))  # fmt: skip
    ks = draw(st.lists(st.integers(1, 40), min_size=1, max_size=4, unique=True))
    return np.array(scores), list(text_image), ks


@settings(max_examples=300, deadline=None)
@given(_cases())
def test_recall_equals_a_brute_force_ranking(case: tuple[np.ndarray, list[int], list[int]]) -> None:
    scores, text_image, ks = case
    assert _per_k(retrieval_recall(scores, text_image, ks=ks)) == _brute_recall(scores, text_image, ks)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_equals_lavis_without_ties(seed: int) -> None:
    generator = np.random.default_rng(seed)
    n_images = 40
    text_image = generator.permutation(np.repeat(np.arange(n_images), 5)).tolist()  # 5 captions each, as COCO
    scores = generator.normal(size=(n_images, len(text_image))) + 2.0 * (
        np.array(text_image)[None, :] == np.arange(n_images)[:, None]
    )
    lavis = _lavis_report(scores, scores.T, text_image)
    ours = retrieval_recall(scores, text_image).as_dict()
    assert ours.keys() == lavis.keys()
    assert ours == pytest.approx(lavis, abs=1e-12)
    assert 0 < ours["txt_r1"] < 100 and 0 < ours["img_r1"] < 100  # the case is not trivial


def test_a_tie_with_a_non_match_counts_against_the_match() -> None:
    # Two images with two captions each, every score equal: each query's match ties with a non-match.
    recall = retrieval_recall(torch.zeros(2, 4), [0, 0, 1, 1], ks=(1, 2, 3))
    assert recall.txt_r == (0.0, 0.0, 100.0)  # both other-image captions are counted above
    assert recall.img_r == (0.0, 100.0, 100.0)


def test_matches_tied_with_each_other_do_not_push_each_other_down() -> None:
    scores = torch.tensor([[1.0, 1.0, 0.4], [0.0, 0.0, 0.5]])  # image 0's two captions tie at the top
    recall = retrieval_recall(scores, [0, 0, 1], ks=(1,))
    assert recall.txt_r == (100.0,)
    assert recall.img_r == (100.0,)


def test_a_left_out_candidate_at_minus_infinity_ties_pessimistically() -> None:
    scores = torch.tensor([[-torch.inf, -torch.inf, 3.0], [-torch.inf, 2.0, 1.0]])
    recall = retrieval_recall(scores, [0, 1, 1], ks=(1, 2))
    # Image 0's caption ties with text 1 at -inf, below text 2: rank 2. Image 1: text 1 first.
    assert recall.txt_r == (50.0, 50.0)
    # Text 0 (image 0) ties with image 1 at -inf: rank 1; text 1: image 1 first; text 2: image 0 above it.
    assert recall.img_r == (pytest.approx(100 / 3), 100.0)


def test_fewer_candidates_than_k_gives_100_percent() -> None:
    # Every match scores lowest, yet with 3 images and 3 texts every rank is below 5.
    scores = 1.0 - torch.eye(3)
    recall = retrieval_recall(scores, [0, 1, 2], ks=(1, 3, 5, 10))
    assert recall.txt_r == (0.0, 100.0, 100.0, 100.0)
    assert recall.img_r == (0.0, 100.0, 100.0, 100.0)


def test_means_and_lavis_keys() -> None:
    recall = RetrievalRecall(ks=(1, 5, 10), txt_r=(10.0, 40.0, 70.0), img_r=(20.0, 50.0, 50.0))
    assert recall.as_dict() == {
        "txt_r1": 10.0, "txt_r5": 40.0, "txt_r10": 70.0, "txt_r_mean": 40.0,
        "img_r1": 20.0, "img_r5": 50.0, "img_r10": 50.0, "img_r_mean": 40.0, "r_mean": 40.0,
    }  # fmt: skip
    assert RetrievalRecall(ks=(1,), txt_r=(0.0,), img_r=(30.0,)).r_mean == 15.0


def test_numpy_torch_and_half_precision_agree() -> None:
    generator = np.random.default_rng(3)
    scores = generator.normal(size=(6, 12)).astype(np.float32)
    text_image = np.repeat(np.arange(6), 2)
    expected = _brute_recall(scores, text_image.tolist(), [1, 5, 10])
    for given_scores in (scores, torch.from_numpy(scores), torch.from_numpy(scores).double()):
        assert _per_k(retrieval_recall(given_scores, text_image)) == expected
    half = torch.from_numpy(scores).bfloat16()
    expected_half = _brute_recall(half.float().numpy(), text_image.tolist(), [1, 5, 10])
    assert _per_k(retrieval_recall(half, torch.from_numpy(text_image))) == expected_half


def test_scores_t2i_ranks_images_for_texts() -> None:
    scores = torch.eye(2)  # perfect image -> text
    scores_t2i = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # every text prefers the other image
    recall = retrieval_recall(scores, [0, 1], ks=(1,), scores_t2i=scores_t2i)
    assert (recall.txt_r, recall.img_r) == ((100.0,), (0.0,))


@pytest.mark.parametrize(
    ("scores", "text_image", "ks", "message"),
    [
        (torch.zeros(2, 3), [0, 1], (1,), "one image index per text, 3"),
        (torch.zeros(3), [0, 1, 2], (1,), "2-D matrix"),
        (torch.zeros(2, 3), [0, 0, 0], (1,), "image 1 has no text"),
        (torch.zeros(2, 3), [0, 1, 2], (1,), "text_image[2] = 2 is not an image index"),
        (torch.zeros(2, 3), [0.0, 1.0, 1.0], (1,), "integer image indices"),
        (torch.tensor([[0.0, torch.nan], [1.0, 2.0]]), [0, 1], (1,), "1 NaN entries (the first at (0, 1))"),
        (torch.zeros(2, 2, dtype=torch.int64), [0, 1], (1,), "must hold floats"),
        (torch.zeros(2, 2), [0, 1], (0, 5), "at least 1"),
        (torch.zeros(2, 2), [0, 1], (-1,), "at least 1"),
        (torch.zeros(2, 2), [0, 1], (), "at least 1"),
    ],
)
def test_bad_input_is_refused(scores: torch.Tensor, text_image: list, ks: tuple, message: str) -> None:
    with pytest.raises(CaptuneError, match=re.escape(message)):
        retrieval_recall(scores, text_image, ks=ks)


def test_scores_t2i_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(CaptuneError, match=r"pass a \(texts, images\) = \(3, 2\) matrix"):
        retrieval_recall(torch.zeros(2, 3), [0, 1, 1], scores_t2i=torch.zeros(2, 3))


def _reversed_within_top(row: np.ndarray, k: int) -> list[int]:
    """The candidates of one query best first after a head that reverses the contrastive order of the top k."""
    order = sorted(range(len(row)), key=lambda j: -row[j])
    return order[:k][::-1] + order[k:]


@pytest.mark.parametrize("k_test", [1, 3, 5, 100])
def test_rerank_with_a_head_that_reverses_the_top_k(k_test: int) -> None:
    generator = np.random.default_rng(4)
    n_images, text_image = 5, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    sims = generator.normal(size=(n_images, len(text_image))) + 1.5 * np.eye(n_images).repeat(2, axis=1)
    calls: list[int] = []

    def head(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        return -torch.from_numpy(sims)[images, texts]

    reranked = rerank(torch.from_numpy(sims), head, k_test=k_test, add_contrastive=False)
    txt_ranks = [min(_reversed_within_top(sims[i], k_test).index(t) for t in range(10) if text_image[t] == i)
                 for i in range(n_images)]  # fmt: skip
    img_ranks = [_reversed_within_top(sims[:, t], k_test).index(text_image[t]) for t in range(10)]
    for i in range(n_images):  # the final rows order the candidates exactly so
        assert torch.argsort(reranked.i2t[i], descending=True).tolist() == _reversed_within_top(sims[i], k_test)
    recall = retrieval_recall(reranked.i2t, text_image, ks=(1, 2, 5), scores_t2i=reranked.t2i)
    assert _per_k(recall) == _percent(txt_ranks, img_ranks, [1, 2, 5])
    assert calls == [min(k_test, 10)] * n_images + [min(k_test, n_images)] * 10


def test_rerank_numbers_on_a_tiny_matrix() -> None:
    # Each image's own caption is its second-best text by contrast; the head swaps the top 2, so R@1 becomes 100.
    sims = torch.tensor([[0.9, 0.8, 0.1], [0.1, 0.9, 0.8], [0.8, 0.1, 0.9]]).roll(-1, dims=1)
    before = retrieval_recall(sims, [0, 1, 2], ks=(1, 2))
    reranked = rerank(sims, lambda images, texts: -sims[images, texts], k_test=2, add_contrastive=False)
    after = retrieval_recall(reranked.i2t, [0, 1, 2], ks=(1, 2), scores_t2i=reranked.t2i)
    assert (before.txt_r, before.img_r) == ((0.0, 100.0), (0.0, 100.0))
    assert (after.txt_r, after.img_r) == ((100.0, 100.0), (100.0, 100.0))


def test_rerank_adds_the_contrastive_score_and_keeps_the_rest_below_in_order() -> None:
    sims = torch.tensor([[0.5, 0.4, 0.3, 0.2, 0.1]])
    itm = torch.tensor([[10.0, 20.0, 0.0, 0.0, 0.0]])
    reranked = rerank(sims, lambda images, texts: itm[images, texts], k_test=2)
    assert reranked.i2t[0, :2].tolist() == pytest.approx([10.5, 20.4])
    rest = reranked.i2t[0, 2:]
    assert rest.max() < 10.5 and rest.tolist() == sorted(rest.tolist(), reverse=True)
    assert (rest - sims[0, 2:]).unique().numel() == 1  # one shift: contrastive differences kept
    assert reranked.t2i.shape == (5, 1)


def test_rerank_ties_enter_the_top_k_by_index() -> None:
    sims = torch.zeros(1, 4)
    seen: list[list[int]] = []

    def head(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        seen.append(texts.tolist())
        return torch.zeros(len(texts))

    rerank(sims, head, k_test=2)
    assert seen[0] == [0, 1]


@pytest.mark.parametrize(
    ("sims", "head", "k_test", "message"),
    [
        (torch.zeros(2, 2), lambda i, t: torch.zeros(len(i)), 0, "k_test must be at least 1"),
        (torch.tensor([[0.0, torch.inf], [0.0, 0.0]]), lambda i, t: torch.zeros(len(i)), 1, "finite contrastive"),
        (torch.zeros(2, 2), lambda i, t: torch.zeros(len(i), 2), 2, r"shape \(2,\), got \(2, 2\) for image 0"),
        (torch.zeros(2, 2), lambda i, t: torch.full((len(i),), torch.nan), 2, "non-finite score for image 0"),
    ],
)
def test_rerank_bad_input_is_refused(sims: torch.Tensor, head, k_test: int, message: str) -> None:
    with pytest.raises(CaptuneError, match=message):
        rerank(sims, head, k_test=k_test)
