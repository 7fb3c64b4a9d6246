"""METEOR 1.5 exactly as pycocoevalcap runs it, started in ~0.3 s instead of ~6 s.

pycocoevalcap's `Meteor` runs `java -jar meteor-1.5.jar - - -stdio -l en -norm`, which spends ~6 s loading a 5.3
million-entry paraphrase table before it scores anything. An entry (probability, phrase 1, phrase 2) can only ever
match when its phrases occur in the sentences being scored, so Meteor ships a tool to filter the table to a test set
(`FilterParaphrase`, which keeps an entry when either phrase occurs as a word n-gram of a reference). This module does
the same filtering with a wider net, in well under a second, and passes the filtered table with Meteor's own `-a`:

- It keeps an entry when either phrase occurs in the references *or* the predictions, tokenized three ways: as sent,
  and as Meteor's own `Normalizer` (the class `-norm` calls) outputs them, as is and lowercased. The jar, its other
  options and the protocol (one `SCORE` line per image, then one `EVAL` line) are pycocoevalcap's, so the numbers
  are identical; `tests/test_meteor.py` compares them with the full table on adversarial captions. The one JVM
  option added, `-XX:+UseSerialGC`, picks a garbage collector (less CPU on few cores) and cannot change a result.
- The table is indexed once into the user's cache (~15 s, ~180 MB; `CAPTUNE_CACHE_DIR`, default ~/.cache/captune):
  each distinct phrase gets a 64-bit rolling hash of its words, and filtering is a sorted-array lookup of the
  data's n-gram hashes. A hash collision can only keep an extra entry, never drop one.
- The pipe is written and read in bulk from one thread, so METEOR does not wait on the GIL once per image while
  the Python scorers run.

`CAPTUNE_METEOR_FULL_TABLE=1` (or any failure to build the index) falls back to the full table, the same numbers.
"""

import contextlib
import gzip
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocoevalcap.meteor import meteor as pycoco_meteor
from tqdm import tqdm

from captune.errors import CaptuneError
from captune.files import cache_dir, progress_bar

METEOR_DIR = Path(pycoco_meteor.__file__).parent
PARAPHRASE_TABLE = METEOR_DIR / "data" / "paraphrase-en.gz"
_JAR = METEOR_DIR / pycoco_meteor.METEOR_JAR
_COMMAND = [
    "java",
    "-XX:+UseSerialGC",
    "-jar",
    "-Xmx2G",
    pycoco_meteor.METEOR_JAR,
    "-",
    "-",
    "-stdio",
    "-l",
    "en",
    "-norm",
]
_MAX_PHRASE_WORDS = 7  # the longest phrase in paraphrase-en.gz; the index build checks it
_PRIME = np.uint64(0x100000001B3)  # FNV's 64-bit prime, as the multiplier of the rolling phrase hash
_INDEX_VERSION = 1
_IMAGES_PER_JVM = 4000  # a JVM more only for this many images more (each costs ~0.5 s to start and warm up)
_LINES_PER_WRITE = 1000
_SENTENCES_PER_BLOCK = 50_000


@dataclass
class ParaphraseIndex:
    """paraphrase-en.gz as arrays (memory-mapped from the cache)."""

    words: dict[str, int]
    """Word -> its id; the id picks its random 64-bit code in `word_codes`."""
    word_codes: np.ndarray
    phrase_hashes: np.ndarray
    """Sorted rolling hashes of the distinct phrases; a phrase's id is its position here."""
    phrase_starts: np.ndarray
    """Phrase id -> byte offset of its text in `phrase_text` (one more entry than phrases)."""
    phrase_text: np.ndarray
    entry_phrases: np.ndarray
    """Entry -> (phrase 1 id, phrase 2 id), in the table's order."""
    entry_probabilities: np.ndarray


def meteor_score(
    gts: dict[str, list[str]], res: dict[str, list[str]], *, jvms: int = 1, progress: bool = False
) -> tuple[float, list[float]]:
    """pycocoevalcap's `Meteor().compute_score(gts, res)`: the same numbers, faster.

    With several JVMs, each scores a run of the images (a `SCORE` line gives one image's statistics, whichever JVM
    computes them), and the first one turns all the statistics into the scores (`EVAL`), as one JVM would.

    Args:
        gts: Image id -> tokenized references (as `PTBTokenizer` returns them).
        res: Image id -> a one-caption list, the tokenized prediction; the same keys as gts.
        jvms: METEOR processes to score with (each ~1 CPU core; fewer when there are few images).
        progress: Show a progress bar (stderr) of the images scored.

    Returns:
        The corpus METEOR and the per-image scores in the order of gts' keys.

    Raises:
        CaptuneError: the METEOR JVM failed (its error output is quoted).
    """
    if gts.keys() != res.keys() or any(len(captions) != 1 for captions in res.values()):
        raise ValueError("meteor_score needs one prediction for every referenced image, as Meteor.compute_score")
    ids = list(gts)
    # The lines pycocoevalcap's Meteor._stat writes: references, then the prediction without "|||" and double spaces.
    hypotheses = {image_id: res[image_id][0].replace("|||", "").replace("  ", " ") for image_id in ids}
    count = max(1, min(jvms, len(ids) // _IMAGES_PER_JVM))
    parts = [ids[len(ids) * k // count : len(ids) * (k + 1) // count] for k in range(count)]
    with (
        tempfile.TemporaryDirectory(prefix="captune-meteor-") as scratch,
        progress_bar(len(ids), "METEOR", progress) as bar,
        contextlib.ExitStack() as stack,
    ):
        command = list(_COMMAND)
        table = _filtered_table([*hypotheses.values(), *(ref for refs in gts.values() for ref in refs)], Path(scratch))
        if table is not None:
            command += ["-a", str(table)]
        processes = [stack.enter_context(_Jvm(command, Path(scratch) / f"stderr-{k}.txt")) for k in range(count)]

        def statistics(jvm: _Jvm, part: list[str]) -> list[str]:
            lines = (" ||| ".join(("SCORE", " ||| ".join(gts[i]), hypotheses[i])) for i in part)
            return jvm.ask(lines, len(part), bar)

        with ThreadPoolExecutor(max_workers=count) as pool:
            stats = [stat for part in pool.map(statistics, processes, parts) for stat in part]
        answers = processes[0].ask(["EVAL" + "".join(f" ||| {stat}" for stat in stats)], len(stats) + 1)
    return float(answers[-1]), [float(answer) for answer in answers[:-1]]


class _Jvm:
    """A Meteor process spoken to in bulk: requests written by one thread in blocks, answers read in large chunks."""

    def __init__(self, command: list[str], stderr_path: Path) -> None:
        self._stderr_path = stderr_path
        self._stderr = stderr_path.open("wb")
        self._process = subprocess.Popen(
            command, cwd=METEOR_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr
        )
        self._pending = b""

    def __enter__(self) -> "_Jvm":
        return self

    def __exit__(self, *exc: object) -> None:
        self._process.kill()
        self._process.wait()
        for stream in (self._process.stdin, self._process.stdout, self._stderr):
            if stream is not None:
                with contextlib.suppress(BrokenPipeError):  # unsent requests to a JVM that died
                    stream.close()

    def ask(self, lines: Iterable[str], num_answers: int, bar: tqdm | None = None) -> list[str]:
        """Sends the lines and returns the next num_answers answer lines, stripped; counts the answers on bar."""
        assert self._process.stdin is not None and self._process.stdout is not None
        # Meteor answers while it reads, so writing everything before reading would fill both pipes and deadlock.
        writer = threading.Thread(target=self._write, args=(lines,), daemon=True)
        writer.start()
        answers: list[bytes] = []
        fd = self._process.stdout.fileno()
        while len(answers) < num_answers:
            chunk = os.read(fd, 1 << 20)  # waits without the GIL, and takes it once per chunk, not once per line
            if not chunk:
                writer.join()
                raise CaptuneError(
                    f"METEOR (Java) stopped after {len(answers)} of {num_answers} answers: {self._error_text()}"
                )
            *complete, self._pending = (self._pending + chunk).split(b"\n")
            if bar is not None:
                bar.update(min(len(answers) + len(complete), num_answers) - len(answers))
            answers += complete
        writer.join()
        return [answer.decode().strip() for answer in answers[:num_answers]]

    def _write(self, lines: Iterable[str]) -> None:
        assert self._process.stdin is not None
        try:
            iterator = iter(lines)
            while block := list(itertools.islice(iterator, _LINES_PER_WRITE)):
                self._process.stdin.write("".join(f"{line}\n" for line in block).encode())
            self._process.stdin.flush()
        except BrokenPipeError:
            pass  # the JVM died; the reader sees its stdout close and reports the error

    def _error_text(self) -> str:
        self._process.wait()
        self._stderr.flush()
        text = self._stderr_path.read_text(errors="replace").strip()
        return text[-2000:] or f"exit status {self._process.returncode}, no error output"


def _filtered_table(sentences: list[str], scratch: Path) -> Path | None:
    """Writes the paraphrase entries the sentences can use to scratch/paraphrase.gz; None means use the full table."""
    if os.environ.get("CAPTUNE_METEOR_FULL_TABLE") == "1":
        return None
    index = paraphrase_index()
    if index is None:
        return None
    normalizer = _Normalizer(sentences, scratch)  # a JVM of its own, working while Python hashes the raw tokens
    wanted = np.zeros(len(index.phrase_hashes), dtype=bool)
    # In blocks of sentences, so that the word ids of a large corpus are never all held at once.
    for block in _blocks(sentences):
        wanted[_phrase_ids(index, _token_lists(block))] = True
    try:
        for block in _blocks(normalizer.result()):
            wanted[_phrase_ids(index, _token_lists(block))] = True
    except _IndexUnusable as error:
        _full_table(error)
        return None
    entries = np.flatnonzero(wanted[index.entry_phrases[:, 0]] | wanted[index.entry_phrases[:, 1]])
    pairs = index.entry_phrases[entries].tolist()
    starts = index.phrase_starts
    text = {p: index.phrase_text[starts[p] : starts[p + 1]].tobytes() for p in {p for pair in pairs for p in pair}}
    probabilities = index.entry_probabilities[entries].tolist()
    path = scratch / "paraphrase.gz"
    with gzip.open(path, "wb", compresslevel=1) as out:
        out.write(
            b"".join(
                b"%r\n%s\n%s\n" % (probability, text[first], text[second])
                for probability, (first, second) in zip(probabilities, pairs, strict=True)
            )
        )
    return path


def _blocks(sentences: Iterable[str]) -> Iterator[list[str]]:
    iterator = iter(sentences)
    while block := list(itertools.islice(iterator, _SENTENCES_PER_BLOCK)):
        yield block


def _token_lists(sentences: list[str]) -> list[list[str]]:
    """Each sentence split on white space, and again lowercased when that changes it (Meteor lowercases)."""
    return [sentence.split() for sentence in sentences] + [
        sentence.lower().split() for sentence in sentences if sentence.lower() != sentence
    ]


class _Normalizer:
    """The sentences as Meteor's `-norm` sees them: its own Normalizer class (language en, punctuation kept)."""

    def __init__(self, sentences: list[str], scratch: Path) -> None:
        self._count = len(sentences)
        with (scratch / "sentences.txt").open("wb") as text:
            for block in _blocks(sentences):
                text.write("".join(f"{sentence}\n" for sentence in block).encode())
        self._output = scratch / "normalized.txt"
        self._errors = scratch / "normalizer-errors.txt"
        command = ["java", "-cp", str(_JAR), "edu.cmu.meteor.util.Normalizer", "en", "true"]
        with (
            (scratch / "sentences.txt").open("rb") as stdin,
            self._output.open("wb") as stdout,
            self._errors.open("wb") as stderr,
        ):
            self._process = subprocess.Popen(command, stdin=stdin, stdout=stdout, stderr=stderr)

    def result(self) -> Iterator[str]:
        """Waits for the normalizer, then yields the normalized sentences, one per input sentence.

        Raises:
            _IndexUnusable: the normalizer failed or gave another number of lines (before any line is yielded).
        """
        returncode = self._process.wait()
        with self._output.open("rb") as lines:
            count = sum(1 for _ in lines)
        if returncode != 0 or count < self._count:
            raise _IndexUnusable(f"Meteor's Normalizer failed: {self._errors.read_text(errors='replace')[-500:]}")
        with self._output.open("rb") as lines:
            for line in itertools.islice(lines, self._count):
                yield line.decode(errors="replace").rstrip("\n")


def _phrase_ids(index: ParaphraseIndex, token_lists: Iterable[list[str]]) -> np.ndarray:
    """Ids of the table's phrases that occur as word n-grams of the token lists (plus, by chance, a few more)."""
    unknown = len(index.word_codes)
    ids: list[int] = []
    for tokens in token_lists:
        ids += [index.words.get(token, unknown) for token in tokens]
        ids.append(unknown)  # no n-gram crosses from one sentence into the next
    word_ids = np.asarray(ids, dtype=np.int64)
    known = word_ids < unknown
    codes = np.append(index.word_codes, np.uint64(0))[word_ids]
    found = []
    hashes = np.zeros(len(word_ids), dtype=np.uint64)
    valid = np.ones(len(word_ids), dtype=bool)
    for n in range(1, _MAX_PHRASE_WORDS + 1):
        # The n-gram starting at i: hash_n[i] = hash_{n-1}[i] * prime + code[i + n - 1].
        hashes = hashes[: len(word_ids) - n + 1] * _PRIME + codes[n - 1 :]
        valid = valid[: len(word_ids) - n + 1] & known[n - 1 :]
        candidates = np.unique(hashes[valid])
        positions = np.searchsorted(index.phrase_hashes, candidates)
        positions[positions == len(index.phrase_hashes)] = 0
        found.append(positions[index.phrase_hashes[positions] == candidates])
    return np.concatenate(found)


def _full_table(reason: Exception) -> None:
    """Says why METEOR falls back to its full paraphrase table (the same numbers, a slower start)."""
    print(f"captune: METEOR will load its full paraphrase table ({reason})", file=sys.stderr)


class _IndexUnusable(Exception):
    """The filtered table cannot be made; METEOR then loads the full one (same numbers, slower start)."""


_MAPPED = ("phrase_starts", "phrase_text", "entry_probabilities")
_ARRAYS = ("word_codes", "phrase_hashes", "phrase_starts", "phrase_text", "entry_phrases", "entry_probabilities")


def paraphrase_index(*, build: bool = True) -> ParaphraseIndex | None:
    """Loads the paraphrase index from the cache, building it first (once, ~15 s) when it is missing.

    Returns None, after a warning on stderr, when it cannot be built or read (e.g. a read-only home): METEOR then
    loads the full table, with the same numbers.
    """
    stat = PARAPHRASE_TABLE.stat()
    directory = cache_dir() / f"meteor-paraphrase-v{_INDEX_VERSION}-{stat.st_size}-{stat.st_mtime_ns}"
    try:
        if not (directory / "words.txt").exists():
            if not build:
                return None
            print(f"captune: indexing METEOR's paraphrase table once, into {directory} (~15 s)", file=sys.stderr)
            _build_index(directory)
        # Hashes and entries are read whole for every call; the phrase texts only where an entry is kept.
        arrays = {
            name: np.load(directory / f"{name}.npy", mmap_mode="r" if name in _MAPPED else None) for name in _ARRAYS
        }
        words = (directory / "words.txt").read_text(encoding="utf-8").split("\n")
        return ParaphraseIndex(words={word: i for i, word in enumerate(words)}, **arrays)
    except (OSError, ValueError, _IndexUnusable) as error:
        _full_table(error)
        return None


def _build_index(directory: Path) -> None:
    """Reads paraphrase-en.gz (entries of 3 lines: probability, phrase 1, phrase 2) into arrays in directory."""
    lines = gzip.decompress(PARAPHRASE_TABLE.read_bytes()).split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if len(lines) % 3:
        raise _IndexUnusable(f"{PARAPHRASE_TABLE} has {len(lines)} lines, not entries of 3")
    phrase_of: dict[bytes, int] = {}
    entry_phrases = np.fromiter(
        (
            phrase_of.setdefault(phrase, len(phrase_of))
            for pair in zip(lines[1::3], lines[2::3], strict=True)
            for phrase in pair
        ),
        dtype=np.int64,
    ).reshape(-1, 2)
    probabilities = np.fromiter(map(float, lines[0::3]), dtype=np.float64)
    del lines
    phrases = list(phrase_of)
    del phrase_of
    word_of: dict[bytes, int] = {}
    lengths = np.fromiter((len(phrase.split(b" ")) for phrase in phrases), dtype=np.int64)
    word_ids = np.fromiter((word_of.setdefault(w, len(word_of)) for w in b" ".join(phrases).split(b" ")), np.int64)
    if lengths.max() > _MAX_PHRASE_WORDS or any(b"\t" in w or not w for w in word_of):
        raise _IndexUnusable(f"{PARAPHRASE_TABLE} has phrases longer than {_MAX_PHRASE_WORDS} words or odd spacing")
    word_codes = np.random.default_rng(0).integers(0, 2**64, size=len(word_of), dtype=np.uint64, endpoint=False)
    # The rolling hash of each phrase, computed a word position at a time over all phrases of at least that length.
    starts = np.concatenate(([0], np.cumsum(lengths)))
    hashes = np.zeros(len(phrases), dtype=np.uint64)
    for position in range(_MAX_PHRASE_WORDS):
        longer = lengths > position
        hashes[longer] = hashes[longer] * _PRIME + word_codes[word_ids[starts[:-1][longer] + position]]
    order = np.argsort(hashes, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    text = [phrases[i] for i in order.tolist()]
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        arrays: dict[str, np.ndarray] = {
            "word_codes": word_codes,
            "phrase_hashes": hashes[order],
            "phrase_starts": np.concatenate(([0], np.cumsum([len(t) for t in text]))).astype(np.int64),
            "phrase_text": np.frombuffer(b"".join(text), dtype=np.uint8),
            "entry_phrases": rank[entry_phrases].astype(np.uint32),
            "entry_probabilities": probabilities,
        }
        for name, array in arrays.items():
            np.save(staging / f"{name}.npy", array)
        (staging / "words.txt").write_text("\n".join(w.decode("utf-8") for w in word_of), encoding="utf-8")
        os.replace(staging, directory)  # another process may have won the race: its index is the same
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (directory / "words.txt").exists():
            raise


def main() -> None:
    """`python -m captune.meteor`: builds the paraphrase index now (make setup does), so no evaluation waits on it."""
    if paraphrase_index() is None:
        raise SystemExit(1)
    print(f"captune: METEOR's paraphrase index is ready in {cache_dir()}")


if __name__ == "__main__":
    main()
