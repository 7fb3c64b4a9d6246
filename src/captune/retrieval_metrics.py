"""Image-text retrieval Recall@K as the COCO / Flickr30k protocol computes it (LAVIS, `lavis/tasks/retrieval.py`
`_report_metrics`), in percent, unrounded; and the re-ranking of the top `k_test` candidates by the matching head.

The scores are a matrix of shape (images, texts); `text_image[t]` is the image caption `t` belongs to, and every
caption of an image is a match for it. Image -> text (`txt_r*`): an image's rank is the best rank among its
captions. Text -> image (`img_r*`): a caption's rank is its image's rank. R@K is the share of queries ranked in the
first K, times 100.

Where this differs from LAVIS (neither changes a number on scores without ties):
- Ties are counted pessimistically, with one exception: a query's rank is the number of *non-matching* candidates
  scoring at least as high as its best match. A non-match tied with the best match counts as ranked above it, so a
  constant score matrix gives R@1 = 0 rather than what `np.argsort` happens to place first; matches tied with one
  another do not push each other down (one of them is first whatever the order). LAVIS's rank is the position in
  `np.argsort(score)[::-1]`, which orders ties by reversed index.
- Fewer candidates than K (say 3 images and R@5): every rank is below K, so R@K is 100% whenever a match exists,
  which it always does here (an image without a caption is refused).
- Malformed input (not a matrix, `text_image` of the wrong length or naming no image, an image without a caption,
  NaN scores, K < 1) is an error saying what to fix.

`best/` in LAVIS: `agg_metrics` there is `txt_r_mean`; `r_mean` is the mean of all six numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from captune.errors import CaptuneError

PairScorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""`(image_indices, text_indices) -> scores`: the matching head's score for each (image, text) pair, 1-D, one per
pair; the two index tensors are 1-D `int64` of the same length (one query against its `k_test` candidates)."""

Scores = torch.Tensor | np.ndarray


@dataclass(frozen=True)
class RetrievalRecall:
    """Recall@K in both directions, in percent (0-100), unrounded."""

    ks: tuple[int, ...]
    """The K of each number, in the order given."""
    txt_r: tuple[float, ...]
    """Image -> text R@K for each K: an image counts when one of its captions is among its first K texts."""
    img_r: tuple[float, ...]
    """Text -> image R@K for each K: a caption counts when its image is among its first K images."""

    @property
    def txt_r_mean(self) -> float:
        return sum(self.txt_r) / len(self.txt_r)

    @property
    def img_r_mean(self) -> float:
        return sum(self.img_r) / len(self.img_r)

    @property
    def r_mean(self) -> float:
        """The mean of all the numbers of both directions."""
        return (self.txt_r_mean + self.img_r_mean) / 2

    def as_dict(self) -> dict[str, float]:
        """LAVIS's keys: `txt_r1, txt_r5, txt_r10, txt_r_mean, img_r1, ..., img_r_mean, r_mean` (for ks 1, 5, 10)."""
        numbers = {f"txt_r{k}": value for k, value in zip(self.ks, self.txt_r, strict=True)}
        numbers["txt_r_mean"] = self.txt_r_mean
        numbers |= {f"img_r{k}": value for k, value in zip(self.ks, self.img_r, strict=True)}
        numbers["img_r_mean"] = self.img_r_mean
        numbers["r_mean"] = self.r_mean
        return numbers


@dataclass(frozen=True)
class RerankedScores:
    """The final score matrices after re-ranking, one per direction (they differ: each re-ranks its own top k)."""

    i2t: torch.Tensor
    """(images, texts): row i ranks the texts for image i."""
    t2i: torch.Tensor
    """(texts, images): row t ranks the images for text t."""


def retrieval_recall(
    scores: Scores,
    text_image: Sequence[int] | Scores,
    ks: Sequence[int] = (1, 5, 10),
    scores_t2i: Scores | None = None,
) -> RetrievalRecall:
    """Recall@K image -> text and text -> image (ties and fewer candidates than K: see the module docstring).

    Args:
        scores: Similarities, (images, texts), higher is closer; numpy or torch, any float dtype. `-inf` is allowed
            (a candidate left out), NaN is not.
        text_image: For each text (column), the index of its image (row); every image needs at least one text.
        ks: The K of each number, each at least 1.
        scores_t2i: The (texts, images) scores that rank images for each text, when they are not `scores.T` (after
            re-ranking, `RerankedScores.t2i`).

    Returns:
        R@K per K in both directions and their means.

    Raises:
        CaptuneError: A shape that does not match, a `text_image` entry that is not an image index, an image without
            a text, NaN scores, or a K below 1.
    """
    i2t = _as_scores(scores, "scores")
    t2i = i2t.T if scores_t2i is None else _as_scores(scores_t2i, "scores_t2i")
    n_images, n_texts = i2t.shape
    if t2i.shape != (n_texts, n_images):
        raise CaptuneError(
            f"scores_t2i has shape {tuple(t2i.shape)} but scores has {n_images} images and {n_texts} texts; "
            f"pass a (texts, images) = ({n_texts}, {n_images}) matrix"
        )
    owner = _text_image(text_image, n_images, n_texts)
    bad_ks = [k for k in ks if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1]
    if bad_ks or len(ks) == 0:
        raise CaptuneError(f"ks must be one or more integers of at least 1 (R@1, R@5, ...), got {list(ks)}")
    match = owner[None, :] == torch.arange(n_images)[:, None]  # (images, texts)
    txt_ranks = _ranks(i2t, match.to(i2t.device))
    img_ranks = _ranks(t2i, match.T.to(t2i.device))
    return RetrievalRecall(
        ks=tuple(int(k) for k in ks),
        txt_r=tuple(100.0 * int((txt_ranks < k).sum()) / n_images for k in ks),  # LAVIS's arithmetic, to the bit
        img_r=tuple(100.0 * int((img_ranks < k).sum()) / n_texts for k in ks),
    )


def rerank(scores: Scores, score_pairs: PairScorer, k_test: int = 128, add_contrastive: bool = True) -> RerankedScores:
    """Re-ranks each query's top `k_test` candidates by the matching head, in both directions, as LAVIS's BLIP-2
    evaluation does (`compute_sim_matrix`, `k_test=128`); pass the result to `retrieval_recall`.

    For each image, its `k_test` best texts by `scores` get `score_pairs(image, text)` (plus the contrastive score when
    `add_contrastive`, LAVIS's BLIP-2 `score + topk_sim`); likewise for each text and its best images. The other
    candidates keep their contrastive score minus a per-query constant that puts all of them below the lowest
    re-ranked score. LAVIS writes -100 there instead; a shift keeps their contrastive order, so ranks beyond `k_test`
    still mean something (R@K for K > k_test is the contrastive order after the re-ranked ones) and no tie rule
    decides them, and it holds for matching scores of any scale. Among equal contrastive scores, the lower index
    enters the top k first (a stable sort).

    Args:
        scores: Contrastive similarities, (images, texts), finite.
        score_pairs: The matching head (see `PairScorer`); called once per query per direction, with
            `min(k_test, candidates)` pairs, under `torch.no_grad()`.
        k_test: How many candidates of each query to re-rank, at least 1.
        add_contrastive: Add the contrastive score to the matching score (LAVIS's BLIP-2); False re-ranks by the
            matching score alone (LAVIS's BLIP).

    Raises:
        CaptuneError: `scores` is not a finite matrix, `k_test` < 1, or `score_pairs` returns the wrong shape or
            a non-finite score.
    """
    sims = _as_scores(scores, "scores")
    if not torch.isfinite(sims).all():
        raise CaptuneError("rerank needs finite contrastive scores; scores has an infinite entry")
    if k_test < 1:
        raise CaptuneError(f"k_test must be at least 1 (how many candidates to re-rank per query), got {k_test}")

    def image_query(i: int, texts: torch.Tensor) -> torch.Tensor:
        return score_pairs(torch.full_like(texts, i), texts)

    def text_query(t: int, images: torch.Tensor) -> torch.Tensor:
        return score_pairs(images, torch.full_like(images, t))

    with torch.no_grad():
        return RerankedScores(
            i2t=_rerank_rows(sims, k_test, image_query, add_contrastive, "image"),
            t2i=_rerank_rows(sims.T, k_test, text_query, add_contrastive, "text"),
        )


def _rerank_rows(
    sims: torch.Tensor,
    k_test: int,
    score_row: Callable[[int, torch.Tensor], torch.Tensor],
    add_contrastive: bool,
    queries: str,
) -> torch.Tensor:
    """Each row is a query: its top k columns get the matching score, the rest shift below them."""
    k = min(k_test, sims.shape[1])
    top_sims, top = torch.sort(sims, dim=1, descending=True, stable=True)
    top_sims, top = top_sims[:, :k], top[:, :k]
    matched = torch.empty_like(top_sims)
    for query in range(sims.shape[0]):
        row = torch.as_tensor(score_row(query, top[query]))
        if row.shape != (k,):
            raise CaptuneError(
                f"score_pairs must return one score per pair, shape ({k},), got {tuple(row.shape)} for {queries} "
                f"{query}; return the matching head's scores as a 1-D tensor (the match logit or probability)"
            )
        if not torch.isfinite(row).all():
            raise CaptuneError(f"score_pairs returned a non-finite score for {queries} {query}: {row.tolist()}")
        matched[query] = row.to(matched)
    final_top = matched + top_sims if add_contrastive else matched
    # Every left-out score drops to at most (lowest re-ranked score - 1); the shift is per query, which ranking allows.
    shift = sims.max(dim=1).values - final_top.min(dim=1).values + 1
    return (sims - shift[:, None]).scatter(1, top, final_top)


def _ranks(scores: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's best match: the non-matches scoring at least as high (ties count against it)."""
    best = scores.masked_fill(~match, -torch.inf).max(dim=1).values
    return ((scores >= best[:, None]) & ~match).sum(dim=1)


def _as_scores(scores: Scores, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(scores)
    if tensor.ndim != 2 or 0 in tensor.shape:
        raise CaptuneError(f"{name} must be a non-empty 2-D matrix (images, texts), got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise CaptuneError(f"{name} must hold floats (similarities), got {tensor.dtype}")
    if tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.float()  # half precision would turn close scores into ties
    nan = torch.isnan(tensor)
    if nan.any():
        first = tuple(int(i) for i in nan.nonzero()[0])
        raise CaptuneError(
            f"{name} has {int(nan.sum())} NaN entries (the first at {first}); a NaN similarity has no rank, "
            f"check the embeddings for NaN (a diverged model) before scoring"
        )
    return tensor


def _text_image(text_image: Sequence[int] | Scores, n_images: int, n_texts: int) -> torch.Tensor:
    owner = torch.as_tensor(text_image)
    if owner.ndim != 1 or len(owner) != n_texts:
        raise CaptuneError(
            f"text_image must give one image index per text, {n_texts} (the columns of scores), "
            f"got shape {tuple(owner.shape)}"
        )
    if owner.is_floating_point() or owner.dtype == torch.bool:
        raise CaptuneError(f"text_image must hold integer image indices, got {owner.dtype}")
    outside = ((owner < 0) | (owner >= n_images)).nonzero()
    if len(outside):
        t = int(outside[0])
        raise CaptuneError(
            f"text_image[{t}] = {int(owner[t])} is not an image index: scores has {n_images} images (rows 0 to "
            f"{n_images - 1})"
        )
    captions = torch.bincount(owner.long().cpu(), minlength=n_images)
    empty = (captions == 0).nonzero()
    if len(empty):
        raise CaptuneError(
            f"image {int(empty[0])} has no text in text_image ({len(empty)} images without one); every image needs "
            f"a caption to be retrieved: drop those rows from scores"
        )
    return owner.long().cpu()
