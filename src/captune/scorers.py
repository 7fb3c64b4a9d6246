"""pycocoevalcap's BLEU, ROUGE-L and CIDEr-D on a corpus in chunks: bounded memory, worker processes, a progress bar,
and the numbers of one call of each scorer on the whole corpus.

Called on a whole corpus, each pycocoevalcap scorer keeps every image's n-gram counts until it is done: ~50 kB an
image for 50-word captions with 5 references, so 200,000 images would need ~10 GB. Here the corpus is scored
`CHUNK_IMAGES` images at a time, each chunk in a worker process, and only the small numbers each scorer sums over
images stay: BLEU's per-image counts (test and reference lengths, guessed and correct n-grams), the per-image ROUGE-L
and CIDEr-D scores, and CIDEr-D's document frequencies (which it needs over the whole corpus, so their size grows with
the number of distinct n-grams in the references).

Every number is computed by pycocoevalcap's own code, in the order its scorers use:

1. Document frequencies: `CiderScorer.compute_doc_freq` on each chunk's references; the chunks' counts are summed
   (whole numbers in floats, so the sum is exact).
2. Each chunk: `Rouge.compute_score` (per-image ROUGE-L); `BleuScorer` cooks the chunk's images (their counts are kept);
   `CiderScorer.compute_cider` with the corpus's document frequencies and the corpus's size (it takes log(number of
   images) from `len(crefs)`, which `_CorpusSized` reports).
3. The corpus: BLEU from one `BleuScorer.compute_score` over all kept counts (the per-image BLEU comes out of the same
   call), ROUGE-L and CIDEr-D as the mean of the per-image scores, as `np.mean(np.array(scores))` like theirs.

The workers are spawned, so a script that calls this on more than one chunk must keep its top-level code under
`if __name__ == "__main__":` (Python's rule for every spawned process); `workers=1` scores in this process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import numpy as np
from pycocoevalcap.bleu.bleu_scorer import BleuScorer
from pycocoevalcap.cider.cider_scorer import CiderScorer
from pycocoevalcap.rouge.rouge import Rouge

from captune.files import progress_bar

CHUNK_IMAGES = 2000
"""Images per chunk: ~1 s of one core's work each for 50-word captions, ~4 MB of text to send to a worker."""

_BLEU_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")

# A worker's copy of the corpus's document frequencies (`_keep_frequencies` sets it when the worker starts).
_worker_frequencies: _Frequencies | None = None


class _Frequencies(dict[tuple[str, ...], float]):
    """Document frequencies that read 0.0 for an n-gram no reference has, as CiderScorer's defaultdict does, without
    adding it (CiderScorer looks up the predictions' n-grams too)."""

    def __missing__(self, key: tuple[str, ...]) -> float:
        return 0.0


class _CorpusSized(list[Any]):
    """A chunk's cooked references that give the corpus's size as their length: `CiderScorer.compute_cider` weighs
    n-grams by log(number of images) - log(document frequency) and takes the number of images from len(crefs)."""

    def __init__(self, items: list[Any], corpus_size: int) -> None:
        super().__init__(items)
        self.corpus_size = corpus_size

    def __len__(self) -> int:
        return self.corpus_size


@dataclass
class _Chunk:
    """The tokenized captions of a run of images, in corpus order."""

    references: list[list[str]]
    predictions: list[str]
    corpus_size: int
    """Images in the whole corpus (CIDEr-D's log(number of documents))."""
    names: tuple[str, ...]
    """The metrics asked for."""


@dataclass
class _ChunkScores:
    """What one chunk contributes to the corpus scores."""

    rouge: list[float]
    bleu_counts: list[dict[str, Any]]
    cider: list[float]


def corpus_scores(
    gts: dict[str, list[str]],
    res: dict[str, list[str]],
    names: Sequence[str],
    *,
    workers: int | None = None,
    progress: bool = False,
) -> dict[str, tuple[float, list[float]]]:
    """Scores BLEU-1..4, ROUGE-L and CIDEr-D (those of them in `names`) as pycocoevalcap's Bleu(4), Rouge and Cider
    `compute_score(gts, res)` would.

    Args:
        gts: Image id -> tokenized references.
        res: Image id -> a one-caption list, the tokenized prediction; the same keys as gts.
        names: Metric names; the others are ignored (METEOR is not computed here).
        workers: Worker processes; None: `usable_cpus()`. With one worker, or a corpus of one chunk, everything runs
            in this process.
        progress: Show a progress bar (on stderr) of the images scored.

    Returns:
        Metric name -> (corpus score, per-image scores in the order of gts' keys).
    """
    wanted = tuple(name for name in (*_BLEU_NAMES, "ROUGE_L", "CIDEr") if name in names)
    if not wanted:
        return {}
    chunks = list(_chunks(gts, res, wanted))
    count = min(workers or usable_cpus(), len(chunks))
    passes = 2 if "CIDEr" in wanted else 1
    bar = progress_bar(passes * len(gts), "BLEU, ROUGE-L, CIDEr-D", progress)
    with bar:
        frequencies = _Frequencies()
        if "CIDEr" in wanted:
            for chunk_frequencies, size in _mapped(_document_frequencies, chunks, count):
                for ngram, frequency in chunk_frequencies.items():
                    frequencies[ngram] = frequencies.get(ngram, 0.0) + frequency
                bar.update(size)
        scored: list[_ChunkScores] = []
        for chunk_scores, size in _mapped(_chunk_scores, chunks, count, frequencies):
            scored.append(chunk_scores)
            bar.update(size)
    return _corpus(scored, wanted)


def _chunks(gts: dict[str, list[str]], res: dict[str, list[str]], names: tuple[str, ...]) -> Iterator[_Chunk]:
    ids = list(gts)
    for start in range(0, len(ids), CHUNK_IMAGES):
        part = ids[start : start + CHUNK_IMAGES]
        yield _Chunk([gts[image_id] for image_id in part], [res[image_id][0] for image_id in part], len(ids), names)


def _mapped(
    function: Callable[..., Any], chunks: list[_Chunk], workers: int, frequencies: _Frequencies | None = None
) -> Iterator[tuple[Any, int]]:
    """Yields (function(chunk), images in the chunk) in chunk order, from `workers` spawned processes (given the
    document frequencies when they start) or, with one worker, from this process."""
    if workers <= 1:
        for chunk in chunks:
            yield function(chunk, frequencies), len(chunk.predictions)
        return
    pool: Executor = ProcessPoolExecutor(
        max_workers=workers, mp_context=get_context("spawn"), initializer=_keep_frequencies, initargs=(frequencies,)
    )
    with pool:
        running = [pool.submit(_in_worker, function, chunk) for chunk in chunks]
        for future, chunk in zip(running, chunks, strict=True):
            yield future.result(), len(chunk.predictions)


def _keep_frequencies(frequencies: _Frequencies | None) -> None:
    global _worker_frequencies
    _worker_frequencies = frequencies


def _in_worker(function: Callable[[_Chunk, _Frequencies | None], Any], chunk: _Chunk) -> Any:
    return function(chunk, _worker_frequencies)


def _document_frequencies(chunk: _Chunk, _: _Frequencies | None) -> dict[tuple[str, ...], float]:
    """CIDEr-D's document frequencies of the chunk's references (in how many images each n-gram occurs)."""
    scorer = CiderScorer(n=4, sigma=6.0)
    for references in chunk.references:
        scorer.cook_append(None, references)
    scorer.compute_doc_freq()
    return dict(scorer.document_frequency)


def _chunk_scores(chunk: _Chunk, frequencies: _Frequencies | None) -> _ChunkScores:
    """The asked ones of: per-image ROUGE-L and CIDEr-D, BLEU's per-image counts, of one chunk."""
    scores = _ChunkScores(rouge=[], bleu_counts=[], cider=[])
    pairs = list(zip(chunk.predictions, chunk.references, strict=True))
    if "ROUGE_L" in chunk.names:
        res = {index: [prediction] for index, prediction in enumerate(chunk.predictions)}
        scores.rouge = Rouge().compute_score(dict(enumerate(chunk.references)), res)[1].tolist()
    if any(name in _BLEU_NAMES for name in chunk.names):
        bleu = BleuScorer(n=4)
        for pair in pairs:
            bleu += pair
        scores.bleu_counts = bleu.ctest
    if "CIDEr" in chunk.names:
        assert frequencies is not None
        cider = CiderScorer(n=4, sigma=6.0)
        for pair in pairs:
            cider += pair
        cider.document_frequency = frequencies
        cider.crefs = _CorpusSized(cider.crefs, chunk.corpus_size)
        scores.cider = [float(score) for score in cider.compute_cider()]
    return scores


def _corpus(scored: list[_ChunkScores], wanted: tuple[str, ...]) -> dict[str, tuple[float, list[float]]]:
    """The corpus scores from the chunks', as the whole-corpus calls compute them."""
    results: dict[str, tuple[float, list[float]]] = {}
    if any(name in _BLEU_NAMES for name in wanted):
        bleu = BleuScorer(n=4)
        bleu.ctest = [counts for chunk in scored for counts in chunk.bleu_counts]
        bleu.crefs = [None] * len(bleu.ctest)  # compute_score reads only the cooked predictions
        corpus, per_image = bleu.compute_score(option="closest", verbose=0)
        results |= {name: (corpus[n], per_image[n]) for n, name in enumerate(_BLEU_NAMES) if name in wanted}
    for name, field in (("ROUGE_L", "rouge"), ("CIDEr", "cider")):
        if name in wanted:
            per_image = [score for chunk in scored for score in getattr(chunk, field)]
            results[name] = (float(np.mean(np.array(per_image))), per_image)
    return results


def usable_cpus() -> int:
    """The CPUs this process may run on, at most 16 (the default number of scoring processes)."""
    return min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
