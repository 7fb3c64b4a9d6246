"""The `captune` command: train, caption, ask, evaluate, eval, report, data check, data convert, merge, serve, app,
index, search, demo.

Every subcommand is a thin shell over the Python API; `main(argv)` is called directly by the tests.

Each module holds a group of subcommands, their flags and what they run: `train` (train, report, demo), `caption`
(caption, eval), `ask`, `evaluate`, `data` (check, convert), `merge`, `serve`, `app` and `search` (index, search);
`output` what they share for their results.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from captune.cli.app import add_app_command
from captune.cli.ask import add_ask_command
from captune.cli.caption import add_caption_command, add_eval_command
from captune.cli.data import add_data_command
from captune.cli.evaluate import add_evaluate_command
from captune.cli.merge import add_merge_command
from captune.cli.search import add_index_command, add_search_command
from captune.cli.serve import add_serve_command
from captune.cli.train import add_demo_command, add_report_command, add_train_command
from captune.errors import CaptuneError

log = logging.getLogger("captune")


def _quiet_libraries() -> None:
    """Keeps the terminal for captune's own progress: no hub lookups offline, no weight-loading bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captune", description="Fine-tune BLIP-2 for captioning; caption; score.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    add_train_command(sub)
    add_caption_command(sub)
    add_ask_command(sub)
    add_evaluate_command(sub)
    add_report_command(sub)
    add_eval_command(sub)
    add_index_command(sub)
    add_search_command(sub)
    add_data_command(sub)
    add_merge_command(sub)
    add_serve_command(sub)
    add_app_command(sub)
    add_demo_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; bad input a user can fix prints `error: ...` and returns 2, never a traceback."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s",
                        stream=sys.stderr)  # fmt: skip
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_libraries()
    try:
        return int(args.func(args))
    except CaptuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        # A file the system refused (a folder made read-only, a full disk) is the user's to fix, not a traceback.
        if err.filename is None or err.strerror is None:
            raise
        print(f"error: {err.filename}: {err.strerror}; check its folder's permissions and free space, then run again",
              file=sys.stderr)  # fmt: skip
        return CaptuneError.exit_code
