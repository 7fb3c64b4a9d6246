"""`captune app`: the web app (Gradio: tabs Caption, Ask, Search, Model) of a saved model (and an index) alone,
without the REST API; the flags of `captune serve`."""

from __future__ import annotations

import argparse
import importlib.util

from captune.cli.serve import add_server_flags, run
from captune.errors import CaptuneError


def cmd_app(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("gradio") is None:  # before the model loads
        raise CaptuneError("captune app needs the app extra (gradio is not installed): pip install 'captune[app]'")
    return run(args, api=False)


def add_app_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`captune app` and its flags."""
    p = sub.add_parser("app", help="serve the web app (Gradio) alone: caption, ask, search, the model",
                       description="captune app --model-dir RUN/best [--vqa-model-dir VQA/best] [--index INDEX] "
                       "[--host 127.0.0.1] [--port 7860]; the app at / (captune serve mounts it beside the REST "
                       "API)")  # fmt: skip
    add_server_flags(p, default_port=7860)
    p.set_defaults(func=cmd_app)
