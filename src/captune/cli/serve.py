"""`captune serve`: the REST API and the web app of a saved model, with its limits, batching and connection flags
(`add_server_flags`, which `captune app` shares)."""

from __future__ import annotations

import argparse

from captune.errors import CaptuneError

# The flags of `captune serve` that set the `ServeSettings` field of the same name (None keeps its default).
_SERVE_SETTINGS = ("device", "merge_adapter", "max_upload_bytes", "max_images", "max_image_pixels", "max_new_tokens",
                   "max_num_beams", "max_batch", "max_wait_ms", "max_queue", "retry_after_s", "idle_timeout_s",
                   "header_timeout_s", "body_timeout_s", "max_connections", "max_connections_per_client",
                   "warm_up")  # fmt: skip


def run(args: argparse.Namespace, *, api: bool) -> int:
    """Runs the server of `captune serve` (api) or `captune app` (the web app alone) with the parsed flags."""
    command = "serve" if api else "app"
    try:
        from captune.serve import ServeSettings, run_server
    except ImportError as err:
        raise CaptuneError(f"captune {command} needs the serve extra ({err.name} is not installed): "
                           "pip install 'captune[serve]'") from None  # fmt: skip
    given = {name: getattr(args, name) for name in _SERVE_SETTINGS if getattr(args, name) is not None}
    run_server(args.model_dir, host=args.host, port=args.port, settings=ServeSettings(**given),
               vqa_model_dir=args.vqa_model_dir, index_dir=args.index, retrieval_model_dir=args.retrieval_model_dir,
               api=api)  # fmt: skip
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    return run(args, api=True)


def add_serve_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`captune serve` and its flags."""
    p = sub.add_parser("serve", help="serve captions and answers over a REST API and the web app",
                       description="captune serve --model-dir RUN/best [--vqa-model-dir VQA/best] [--index INDEX] "
                       "[--host 127.0.0.1] [--port 8000]; the web app at / (the app extra), API POST /v1/captions, "
                       "/v1/answers and /v1/search, OpenAPI at /openapi.json")  # fmt: skip
    add_server_flags(p, default_port=8000)
    p.set_defaults(func=cmd_serve)


def add_server_flags(p: argparse.ArgumentParser, default_port: int) -> None:
    """The model, address, limit and connection flags of `captune serve` and `captune app`."""
    p.add_argument("--model-dir", help="the caption model: RUN/best, RUN/final, a checkpoint, or a plain BLIP-2 "
                   "directory or hub id (may be left out with --index: a server that only searches)")  # fmt: skip
    p.add_argument("--vqa-model-dir", help="a model that answers questions (a task: vqa run, or a plain BLIP-2) for "
                   "/v1/answers and the Ask tab; default: the --model-dir model")  # fmt: skip
    p.add_argument("--index", help="an index `captune index` made, searched by /v1/search and the Search tab, with "
                   "the retrieval model its index.json records")  # fmt: skip
    p.add_argument("--retrieval-model-dir", help="with --index: the retrieval model, where it is not where the index "
                   "records it (the same weights: another is refused)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; the server has no "
                   "authentication, so expose it only behind one)")  # fmt: skip
    p.add_argument("--port", type=int, default=default_port, help=f"1-65535 (default {default_port})")
    p.add_argument("--device", help="auto (default: a GPU when there is one), cpu, cuda, cuda:1, ...")
    p.add_argument("--merge-adapter", action="store_true", default=None,
                   help="merge the LoRA adapter into the base weights at load (as captune caption)")  # fmt: skip
    group = p.add_argument_group("limits and batching")
    group.add_argument("--max-upload-bytes", type=int, help="largest request body (default 20 MiB); 413 beyond")
    group.add_argument("--max-images", type=int, help="images per request (default 16); 422 beyond")
    group.add_argument("--max-image-pixels", type=int, help="width x height of one image, checked before decoding "
                       "(default 40,000,000); 413 beyond")  # fmt: skip
    group.add_argument("--max-new-tokens", type=int, help="highest max_new_tokens a request may ask (default 100)")
    group.add_argument("--max-num-beams", type=int, help="widest beam a request may ask (default 10)")
    group.add_argument("--max-batch", type=int, help="images per generate call (default 16)")
    group.add_argument("--max-wait-ms", type=float, help="wait after the first queued image to fill a batch "
                       "(default 10)")  # fmt: skip
    group.add_argument("--max-queue", type=int, help="images admitted at once (default 64); 503 with Retry-After "
                       "beyond")  # fmt: skip
    group.add_argument("--retry-after-s", type=int, help="Retry-After of a 503, in seconds (default 1)")
    group = p.add_argument_group("connections (beyond a limit: 503 and closed; past a timeout: closed, 408 for a "
                                 "request under way)")  # fmt: skip
    group.add_argument("--idle-timeout-s", type=float, help="close a connection after this long without a byte "
                       "between requests or after it opens (default 5)")  # fmt: skip
    group.add_argument("--header-timeout-s", type=float, help="a request's headers must all come within this long "
                       "of its first byte (default 10)")  # fmt: skip
    group.add_argument("--body-timeout-s", type=float, help="a request's body must all come within this long of its "
                       "headers (default 60)")  # fmt: skip
    group.add_argument("--max-connections", type=int, help="open connections in all (default 256)")
    group.add_argument("--max-connections-per-client", type=int, help="open connections from one IP address "
                       "(default 32; behind a proxy, set it to --max-connections)")  # fmt: skip
    p.add_argument("--warm-up", action="store_true", default=None,
                   help="with a static-cache model: compile every batch size before taking requests")  # fmt: skip
