"""An on-disk vector index: embeddings streamed to disk in chunks, a FAISS index built from them, searched by cosine.

A folder holds:

    index.json            the manifest: dimension, count, metric, model id, FAISS index kind, build parameters, versions
    chunks/000000.npz     one chunk per `add` call: float32 vectors (L2-normalised) and their keys, written atomically;
                          optionally each row's text (a caption index keeps its captions there)
    chunks/000000.queries.npy   optional, beside its chunk: float16 per-row query vectors (rows x queries x dimension),
                          written before the chunk, read memory-mapped (`queries`) so re-scoring a few candidates reads
                          only their rows
    faiss.index           the FAISS index `build` writes (faiss.write_index, atomically)

Vectors are L2-normalised on the way in, so the inner product FAISS computes is the cosine similarity. A chunk is
written to a temporary file and renamed into place (its queries file first), so after a kill the folder holds only
whole chunks (a queries file without its chunk is written over by the next `add`); reopening it
with `VectorIndex.create` lists the keys already stored (`missing` gives the rest) and embedding carries on from there.

`build` makes an exact `IndexFlatIP` unless the count is above `approximate_above`; then an approximate index:
HNSW (`IndexHNSWFlat`, inner product; M=32, efConstruction=100, efSearch=256) by default, or IVF-Flat by name
(nlist = 4 * sqrt(n), at most n; nprobe = 64). `recall_against_exact` measures what the approximate index loses.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from captune.errors import CaptuneError

try:
    import faiss
except ImportError:
    raise CaptuneError("the vector index needs the faiss-cpu package: pip install 'captune[search]'") from None

MANIFEST = "index.json"
CHUNKS = "chunks"
FAISS_FILE = "faiss.index"
APPROXIMATE_KINDS = ("hnsw", "ivf")


@dataclass
class BuildOptions:
    """How `VectorIndex.build` indexes the stored vectors."""

    approximate_above: int | None = None
    """Counts above this get an approximate index (e.g. 100_000); None: always exact (`IndexFlatIP`)."""
    approximate: str = "hnsw"
    """The approximate index: "hnsw" (`IndexHNSWFlat`) or "ivf" (`IndexIVFFlat`)."""
    hnsw_m: int = 32
    """HNSW: neighbours per node; more is better recall, more memory and a slower build."""
    hnsw_ef_construction: int = 100
    """HNSW: candidate list while building."""
    hnsw_ef_search: int = 256
    """HNSW: candidate list while searching; recall@10 >= 0.95 on 20,000 random 64-d vectors at these defaults, but
    0.75 on 50,000 random 256-d ones (0.99 at 1024): check yours with `recall_against_exact`."""
    ivf_nlist: int | None = None
    """IVF: number of lists; None: round(4 * sqrt(n))."""
    ivf_nprobe: int = 64
    """IVF: lists visited per query; random vectors need a large share of them, clustered embeddings far fewer."""
    seed: int = 0
    """The sample IVF's k-means trains on."""


def _normalised(vectors: np.ndarray, dimension: int, what: str) -> np.ndarray:
    """float32 rows of unit length; refuses a wrong shape, non-finite values and zero vectors."""
    array = np.array(vectors, dtype=np.float32, copy=True)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != dimension:
        raise CaptuneError(f"{what}: vectors of shape {tuple(np.shape(vectors))}, the index holds {dimension}-d "
                           f"vectors; embed with the model the index was made with")  # fmt: skip
    if not np.isfinite(array).all():
        raise CaptuneError(f"{what}: vectors hold NaN or infinite values; check the embedding step")
    norms = np.linalg.norm(array, axis=1)
    if (norms == 0).any():
        raise CaptuneError(f"{what}: row {int(np.argmax(norms == 0))} is a zero vector, which has no direction")
    return array / norms[:, None]


def _read_chunk(chunk: Path, field: str) -> np.ndarray:
    """One array ("vectors" or "keys") of a chunk file."""
    try:
        with np.load(chunk) as data:
            return data[field]
    except (OSError, ValueError, KeyError) as e:
        raise CaptuneError(f"{chunk}: unreadable ({e}); delete it and resume to embed its items again") from None


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: a kill leaves the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class VectorIndex:
    """An index folder: `create` (or resume), `add` chunks, `build`, then `open` and `search`."""

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder = folder
        self.manifest = manifest
        self.dimension = int(manifest["dimension"])
        self._chunks = sorted((folder / CHUNKS).glob("[0-9]*.npz"))
        self.keys: list[str] = []
        self._starts: list[int] = []  # each chunk's first row
        for chunk in self._chunks:
            self._starts.append(len(self.keys))
            self.keys.extend(str(k) for k in _read_chunk(chunk, "keys"))
        self._stored = set(self.keys)
        self._faiss: Any = None
        self._texts: list[str] | None = None
        self._queries: dict[int, np.ndarray] = {}  # chunk number -> its memory-mapped queries

    @classmethod
    def create(
        cls,
        folder: str | Path,
        dimension: int,
        model_id: str,
        kind: str = "vectors",
        model_fingerprint: str | None = None,
    ) -> VectorIndex:
        """A new index folder, or the one already there when its dimension, model id, kind and fingerprint match
        (resume after a kill).

        Args:
            folder: The index folder; created if absent.
            dimension: The length of each embedding.
            model_id: What made the embeddings (a hub id or model directory), recorded and checked on resume.
            kind: What the vectors stand for (e.g. "images", "captions"), recorded and checked on resume.
            model_fingerprint: A digest of the model's weights, recorded and checked on resume.
        """
        folder = Path(folder)
        if (folder / MANIFEST).exists():
            index = cls.open(folder)
            there = (index.dimension, index.manifest["model_id"], index.kind, index.manifest.get("model_fingerprint"))
            if there != (dimension, model_id, kind, model_fingerprint):
                raise CaptuneError(f"{folder}: an index of {index.dimension}-d {index.kind} vectors from "
                                   f"{index.manifest['model_id']!r} (fingerprint {there[3]}) is there, not "
                                   f"{dimension}-d {kind} from {model_id!r} (fingerprint {model_fingerprint}); "
                                   f"use another folder or delete this one")  # fmt: skip
            return index
        if folder.exists() and any(folder.iterdir()):
            raise CaptuneError(f"{folder}: not empty and not an index (no {MANIFEST}); choose an empty or new folder")
        if dimension < 1:
            raise CaptuneError(f"{folder}: dimension {dimension}; embeddings need at least one value")
        (folder / CHUNKS).mkdir(parents=True, exist_ok=True)
        manifest = {
            "dimension": dimension,
            "count": 0,
            "metric": "inner_product",
            "normalised": True,
            "model_id": model_id,
            "model_fingerprint": model_fingerprint,
            "kind": kind,
            "queries": None,
            "index_kind": None,
            "build": None,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"faiss": faiss.__version__, "numpy": np.__version__, "python": platform.python_version()},
        }
        index = cls(folder, manifest)
        index._write_manifest()
        return index

    @classmethod
    def open(cls, folder: str | Path) -> VectorIndex:
        """An existing index folder (its chunks, and its FAISS index when built)."""
        folder = Path(folder)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except FileNotFoundError:
            raise CaptuneError(f"{folder}: not a vector index (no {MANIFEST}); make one with `captune index`") from None
        except json.JSONDecodeError as e:
            raise CaptuneError(f"{folder / MANIFEST}: not valid JSON ({e}); rebuild the index") from None
        return cls(folder, manifest)

    @property
    def kind(self) -> str:
        """What the vectors stand for, as `create` recorded it ("vectors" for indexes made before it did)."""
        return str(self.manifest.get("kind", "vectors"))

    @property
    def count(self) -> int:
        """The number of vectors stored (whole chunks only)."""
        return len(self.keys)

    def missing(self, keys: list[str]) -> list[str]:
        """The keys, in order, that are not stored yet: what is left to embed after a kill."""
        return [k for k in keys if k not in self._stored]

    def add(
        self,
        vectors: np.ndarray,
        keys: list[str],
        queries: np.ndarray | None = None,
        texts: list[str] | None = None,
    ) -> None:
        """Store one chunk: `vectors` (n x dimension, normalised here) and the key (image path, caption) of each row;
        optionally each row's query vectors (n x queries x dimension, stored as float16 as given: normalise them
        first) and each row's text. Every chunk of an index holds queries, or none does."""
        array = _normalised(vectors, self.dimension, str(self.folder))
        if len(keys) != len(array):
            raise CaptuneError(f"{self.folder}: {len(array)} vectors but {len(keys)} keys; give one key per vector")
        if texts is not None and len(texts) != len(keys):
            raise CaptuneError(f"{self.folder}: {len(keys)} keys but {len(texts)} texts; give one text per key")
        self._check_queries(queries, len(keys))
        repeated = [k for k in keys if k in self._stored]
        if repeated or len(set(keys)) < len(keys):
            key = repeated[0] if repeated else next(k for i, k in enumerate(keys) if k in keys[:i])
            raise CaptuneError(f"{self.folder}: key {key!r} is repeated or already stored; embed only `missing(keys)`")
        number = int(self._chunks[-1].stem) + 1 if self._chunks else 0
        if queries is not None:
            buffer = io.BytesIO()
            np.save(buffer, np.asarray(queries, dtype=np.float16))
            _write_atomically(self._queries_path(number), buffer.getvalue())
            if self.manifest.get("queries") is None:
                self.manifest["queries"] = int(queries.shape[1])
        buffer = io.BytesIO()
        arrays = {"vectors": array, "keys": np.array(keys, dtype=str)}
        if texts is not None:
            arrays["texts"] = np.array(texts, dtype=str)
        np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy's stubs take allow_pickle for a ** argument
        path = self.folder / CHUNKS / f"{number:06d}.npz"
        _write_atomically(path, buffer.getvalue())
        self._chunks.append(path)
        self._starts.append(len(self.keys))
        self.keys.extend(keys)
        self._stored.update(keys)
        self.manifest["count"] = self.count
        self._write_manifest()

    def _check_queries(self, queries: np.ndarray | None, rows: int) -> None:
        """Refuses queries of the wrong shape, or a chunk with queries where the others have none (or the reverse)."""
        expected = self.manifest.get("queries")
        if queries is None:
            if expected is not None:
                raise CaptuneError(f"{self.folder}: its chunks hold {expected} query vectors a row; give them")
            return
        if expected is None and self._chunks:
            raise CaptuneError(f"{self.folder}: its chunks hold no query vectors; add this one without them")
        shape = tuple(np.shape(queries))
        if len(shape) != 3 or shape[0] != rows or shape[2] != self.dimension or shape[1] != (expected or shape[1]):
            raise CaptuneError(f"{self.folder}: queries of shape {shape}; give {rows} x "
                               f"{expected or 'queries'} x {self.dimension}")  # fmt: skip

    def _queries_path(self, number: int) -> Path:
        return self.folder / CHUNKS / f"{number:06d}.queries.npy"

    def queries(self, rows: np.ndarray | list[int]) -> np.ndarray:
        """The stored query vectors of rows `rows` (in the given order), float32 (len(rows) x queries x dimension),
        read from the memory-mapped queries files."""
        if self.manifest.get("queries") is None:
            raise CaptuneError(f"{self.folder}: the index holds no query vectors per row")
        wanted = np.asarray(rows, dtype=np.int64)
        chunk_of = np.searchsorted(np.asarray(self._starts), wanted, side="right") - 1
        out = np.empty((len(wanted), int(self.manifest["queries"]), self.dimension), dtype=np.float32)
        for c in np.unique(chunk_of):
            number = int(self._chunks[c].stem)
            if number not in self._queries:
                try:
                    self._queries[number] = np.load(self._queries_path(number), mmap_mode="r")
                except (OSError, ValueError) as e:
                    raise CaptuneError(f"{self._queries_path(number)}: unreadable ({e}); delete it and its chunk "
                                       "and resume to embed its items again") from None  # fmt: skip
            where = chunk_of == c
            out[where] = self._queries[number][wanted[where] - self._starts[c]]
        return out

    def texts(self) -> list[str]:
        """Every row's stored text, in row order (read once)."""
        if self._texts is None:
            try:
                self._texts = [str(t) for chunk in self._chunks for t in _read_chunk(chunk, "texts")]
            except CaptuneError:
                raise CaptuneError(f"{self.folder}: the index holds no texts (an index of images?)") from None
        return self._texts

    def _fill(self, index: Any) -> None:
        """Add the stored vectors to a FAISS index chunk by chunk, so they are never in memory twice."""
        for chunk in self._chunks:
            index.add(_read_chunk(chunk, "vectors"))

    def build(self, options: BuildOptions | None = None) -> None:
        """Make the FAISS index over every stored vector and save it with the manifest."""
        options = options or BuildOptions()
        if options.approximate not in APPROXIMATE_KINDS:
            raise CaptuneError(f"approximate={options.approximate!r}; choose one of {', '.join(APPROXIMATE_KINDS)}")
        if self.count == 0:
            raise CaptuneError(f"{self.folder}: no vectors stored; add embeddings before building")
        approximate = options.approximate_above is not None and self.count > options.approximate_above
        kind = options.approximate if approximate else "flat"
        index, params = self._new_faiss_index(kind, options)
        self._fill(index)
        tmp = self.folder / f".{FAISS_FILE}.tmp"
        faiss.write_index(index, str(tmp))
        os.replace(tmp, self.folder / FAISS_FILE)
        self._faiss = index
        self.manifest.update(count=self.count, index_kind=kind, build={**asdict(options), **params},
                             built_count=self.count)  # fmt: skip
        self.manifest["versions"]["faiss_build"] = faiss.__version__
        self._write_manifest()

    def _new_faiss_index(self, kind: str, options: BuildOptions) -> tuple[Any, dict[str, Any]]:
        """An empty (trained, for IVF) FAISS index of `kind` and the parameters it was made with."""
        d = self.dimension
        if kind == "flat":
            return faiss.IndexFlatIP(d), {}
        if kind == "hnsw":
            hnsw = faiss.IndexHNSWFlat(d, options.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = options.hnsw_ef_construction
            hnsw.hnsw.efSearch = options.hnsw_ef_search
            return hnsw, {}
        # k-means cannot make more lists than points: a small index (under 16 vectors) gets one list a vector.
        nlist = options.ivf_nlist or max(1, min(round(4 * math.sqrt(self.count)), self.count))
        if nlist > self.count:
            raise CaptuneError(f"ivf_nlist={nlist}, but the index holds {self.count} vectors; give at most that many")
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        # k-means on a sample: FAISS asks for >= 39 points a list and uses at most 256.
        rng = np.random.default_rng(options.seed)
        rows = np.sort(rng.choice(self.count, size=min(self.count, 256 * nlist), replace=False))
        ivf.train(self.vectors(rows))
        ivf.nprobe = min(options.ivf_nprobe, nlist)
        return ivf, {"nlist": nlist, "nprobe": ivf.nprobe, "training_points": len(rows)}

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The stored vectors at sorted positions `rows`, read one chunk at a time."""
        parts, start = [], 0
        for chunk in self._chunks:
            vectors = _read_chunk(chunk, "vectors")
            inside = rows[(rows >= start) & (rows < start + len(vectors))] - start
            parts.append(vectors[inside])
            start += len(vectors)
        return np.concatenate(parts)

    def faiss_index(self) -> Any:
        """The built FAISS index, read from the folder on first use."""
        if self._faiss is None:
            path = self.folder / FAISS_FILE
            if not path.exists():
                raise CaptuneError(f"{self.folder}: the index is not built yet (no {FAISS_FILE}): run `captune index` "
                                   "into it again to finish it (or VectorIndex.build)")  # fmt: skip
            self._faiss = faiss.read_index(str(path))
        if self._faiss.ntotal != self.count:
            raise CaptuneError(f"{self.folder}: {self.count} vectors stored but {self._faiss.ntotal} indexed: "
                               "run build again (`captune index` into the folder again does)")  # fmt: skip
        return self._faiss

    def search(self, queries: np.ndarray, top: int) -> list[list[tuple[str, float]]]:
        """The `top` nearest stored keys of each query by cosine similarity.

        Args:
            queries: One query vector (dimension,) or several (n x dimension); normalised here.
            top: How many results per query; more than the count gives them all.

        Returns:
            Per query, a list of (key, score), scores descending.
        """
        scores, ids = self.search_rows(queries, top)
        return [
            [(self.keys[i], float(s)) for s, i in zip(row_s, row_i, strict=True) if i >= 0]
            for row_s, row_i in zip(scores, ids, strict=True)
        ]

    def search_rows(self, queries: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
        """`search` as FAISS gives it: (scores, row numbers), each (queries x min(top, count)); a row number of -1
        where an approximate index found fewer."""
        if top < 1:
            raise CaptuneError(f"top={top}; ask for at least one result")
        if self.count == 0:
            raise CaptuneError(f"{self.folder}: the index is empty; add embeddings and build it first")
        array = _normalised(queries, self.dimension, f"{self.folder}: queries")
        return self.faiss_index().search(array, min(top, self.count))

    def _write_manifest(self) -> None:
        _write_atomically(self.folder / MANIFEST, (json.dumps(self.manifest, indent=2) + "\n").encode())


def recall_against_exact(index: VectorIndex, queries: np.ndarray, k: int) -> float:
    """Recall@k of `index`'s built FAISS index against exact inner-product search over the same stored vectors.

    Returns:
        The mean over queries of the share of the exact top k that the index also returns in its top k (1.0 for an
        exact index, up to ties).
    """
    approximate = index.faiss_index()
    array = _normalised(queries, index.dimension, f"{index.folder}: queries")
    k = min(k, index.count)
    exact = faiss.IndexFlatIP(index.dimension)
    index._fill(exact)
    _, truth = exact.search(array, k)
    _, found = approximate.search(array, k)
    hits = [len(set(t.tolist()) & set(f.tolist())) for t, f in zip(truth, found, strict=True)]
    return float(np.mean(hits)) / k
