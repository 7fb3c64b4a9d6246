"""`captune index` and `captune search`: embed images (or captions) into a vector index, and search it by text or by
image (`captune.search`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from captune.errors import CaptuneError

IMAGE_BATCH_GPU, IMAGE_BATCH_CPU = 256, 64
"""`captune index`'s images a forward pass: 256 on a GPU, the batch of the measured 657.8 images/s on an H200 with 12
decoding workers (benchmarks/README.md; peak 9.1 GiB with the bf16 copy); 64 on the CPU."""


def _model_id(name: str) -> str:
    """A model directory as its absolute path (so the index finds it from anywhere), a hub id or name as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def cmd_index(args: argparse.Namespace) -> int:
    from captune.generation.files import expand_inputs
    from captune.retrieval import load_retrieval
    from captune.search import index_captions, index_images, read_captions
    from captune.vector_index import APPROXIMATE_KINDS, BuildOptions

    if bool(args.paths) == bool(args.captions):
        raise CaptuneError("give image files or folders to index, or --captions FILE, not both and not neither")
    if args.approximate not in APPROXIMATE_KINDS:
        raise CaptuneError(f"--approximate {args.approximate}: choose one of {', '.join(APPROXIMATE_KINDS)}")
    if args.approximate_above < 0:
        raise CaptuneError(f"--approximate-above {args.approximate_above}: give a count of vectors, 0 or more")
    if args.workers < 0:
        raise CaptuneError(f"--workers {args.workers}: give 0 (decode in this process) or more worker processes")
    build = BuildOptions(approximate_above=args.approximate_above, approximate=args.approximate)
    output = Path(args.output).expanduser()
    if args.captions:
        read = read_captions(Path(args.captions).expanduser())
        for number in read.blank_lines:
            print(f"skipped: {args.captions}:{number}: blank line", file=sys.stderr)
        loaded = load_retrieval(args.model_dir, device=args.device)
        summary = index_captions(read.captions, loaded, output, model_id=_model_id(args.model_dir),
                                 batch_size=args.batch_size or 256, build=build)  # fmt: skip
        summary.skipped += [(f"{args.captions}:{n}", "blank line") for n in read.blank_lines]
        print(summary.line())
        return 0
    paths, failures = expand_inputs(args.paths)
    for failure in failures:
        print(f"error: {failure.error}", file=sys.stderr)
    if not paths:
        raise CaptuneError(f"no image files in {' '.join(args.paths)}; give image files, folders or globs")
    loaded = load_retrieval(args.model_dir, device=args.device)
    gpu = next(loaded.model.parameters()).device.type == "cuda"
    summary = index_images(paths, loaded, output, model_id=_model_id(args.model_dir),
                           batch_size=args.batch_size or (IMAGE_BATCH_GPU if gpu else IMAGE_BATCH_CPU),
                           workers=args.workers, chunk_size=args.chunk_size,
                           build=build, skipped=[(f.image, f.error or "") for f in failures])  # fmt: skip
    print(summary.line())
    return 1 if summary.skipped else 0


def cmd_search(args: argparse.Namespace) -> int:
    from captune.search import SearchIndex

    if (args.text is None) == (args.image is None):
        raise CaptuneError('give a text query ("a dog on the beach") or --image FILE, not both and not neither')
    index = SearchIndex.open(args.index, model_dir=args.model_dir, device=args.device)
    if args.image is not None:
        hits = index.search_image(args.image, args.top, args.candidates, args.rerank)
    else:
        hits = index.search_text(args.text, args.top, args.candidates, args.rerank)
    rows: list[dict[str, object]] = [{"key": h.key, "score": h.score} for h in hits]
    if index.kind == "captions":
        for row in rows:
            row["caption"] = index.caption(str(row["key"]))
    if args.json:
        query = {"image": args.image} if args.image is not None else {"text": args.text}
        print(json.dumps({"index": args.index, "kind": index.kind, **query, "hits": rows}, ensure_ascii=False))
        return 0
    for row in rows:
        print("\t".join([f"{row['score']:.4f}", str(row["key"])] + ([str(row["caption"])] if "caption" in row else [])))
    return 0


def add_index_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`captune index` and its flags."""
    from captune.search import APPROXIMATE_ABOVE

    p = sub.add_parser("index", help="embed images (or captions) into a vector index for `captune search`")
    p.add_argument("paths", nargs="*", help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("--captions", help="index captions instead: a text file (one a line), JSONL or CSV (`caption`, "
                   "optional `id`)")  # fmt: skip
    p.add_argument(
        "--model-dir",
        required=True,
        help="a retrieval model: a Blip2ForImageTextRetrieval directory or hub id, or tiny-retrieval",
    )
    p.add_argument("--output", required=True, help="the index folder (created; an existing one is resumed)")
    p.add_argument("--batch-size", type=int,
                   help=f"images (default {IMAGE_BATCH_GPU} on a GPU, {IMAGE_BATCH_CPU} on the CPU) or captions (256) "
                   "a forward pass")  # fmt: skip
    p.add_argument("--chunk-size", type=int, default=1024, help="images a chunk file, what a kill can lose at most")
    p.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1),
                   help="processes decoding images while the model embeds (default: up to 12)")  # fmt: skip
    p.add_argument("--approximate-above", type=int, default=APPROXIMATE_ABOVE,
                   help=f"build an approximate index above this many vectors (default {APPROXIMATE_ABOVE:,}); "
                   "exact inner product below")  # fmt: skip
    p.add_argument("--approximate", default="hnsw", help="the approximate index: hnsw (default) or ivf")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1, ...")
    p.set_defaults(func=cmd_index)


def add_search_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`captune search` and its flags."""
    p = sub.add_parser("search", help="search an index made by `captune index` by text or by image")
    p.add_argument("index", help="the index folder")
    p.add_argument("text", nargs="?", help="a text query (leave out with --image)")
    p.add_argument("--image", help="an image query: images like it, or captions matching it in a caption index")
    p.add_argument("--top", type=int, default=10, help="results to print (default 10)")
    p.add_argument("--candidates", type=int,
                   help="text -> image: images FAISS proposes and the model re-scores exactly (default max(10 x top, "
                   "100))")  # fmt: skip
    p.add_argument(
        "--rerank",
        type=int,
        default=0,
        help="re-score the best K with the matching head (image files are read again; default 0: none)",
    )
    p.add_argument("--model-dir", help="the model (default: the one the index records; another is refused)")
    p.add_argument("--json", action="store_true", help="print one JSON object: the query and its hits")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1, ...")
    p.set_defaults(func=cmd_search)
