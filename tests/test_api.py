"""The public API of `captune`: every listed name loads, and scoring alone does not import torch."""

from __future__ import annotations

import subprocess
import sys

import captune


def test_every_public_name_loads_from_its_module() -> None:
    assert sorted(captune.__all__) == sorted(captune._EXPORTS)
    for name in captune.__all__:
        assert getattr(captune, name).__name__ == name


def test_train_stays_the_function_after_its_module_is_imported() -> None:
    import captune.training.recipe  # noqa: F401
    from captune import train

    assert callable(train) and train.__module__ == "captune.training.recipe"


def test_scoring_processes_do_not_import_torch() -> None:
    # Spawned scoring workers import captune.scorers; with torch that would cost seconds and ~400 MB each.
    code = "import sys, captune.scorers, captune.metrics; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
