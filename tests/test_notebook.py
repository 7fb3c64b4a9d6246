"""notebooks/fine_tune.ipynb runs top to bottom on the reduced demo setting, and is committed without outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
from ipykernel.kernelspec import install
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "fine_tune.ipynb"

# Appended to the executed copy only: prints what the test reads back from the kernel.
REPORT = """import json, sys
print(json.dumps({"prefix": sys.prefix, "test_images": len(test_records), "before": before.result.metrics,
                  "after": after.result.metrics}))"""

Executed = tuple[nbformat.NotebookNode, dict[str, Any]]
"""The notebook after a run, and the JSON its REPORT cell printed."""


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> Executed:
    """Runs the notebook in a fresh kernel of this interpreter, in a temporary working directory."""
    tmp = tmp_path_factory.mktemp("notebook")
    env = {
        "CAPTUNE_NOTEBOOK_FAST": "1",
        "HF_HUB_OFFLINE": "1",
        "TMPDIR": str(tmp),  # the notebook's tempfile.mkdtemp() output lands here and is cleaned with it
        # One thread: the tiny model's ops are too small to share, and on a busy 2-core machine OpenMP threads that
        # wait for each other make training about ten times slower.
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    # A kernel spec that names this interpreter, so the kernel imports the captune under test whatever other
    # `python3` specs the machine has.
    spec_dir = Path(install(prefix=str(tmp / "jupyter"), kernel_name="captune-test", env=env)).parent
    manager = KernelManager(kernel_name="captune-test", kernel_spec_manager=KernelSpecManager(kernel_dirs=[spec_dir]))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(REPORT))
    work = tmp / "cwd"
    work.mkdir()
    NotebookClient(notebook, km=manager, timeout=300, resources={"metadata": {"path": str(work)}}).execute()
    report = json.loads("".join(o.get("text", "") for o in notebook.cells[-1].outputs if o.output_type == "stream"))
    return notebook, report


def test_notebook_runs_in_this_interpreter_on_the_fast_setting(executed: Executed) -> None:
    assert Path(executed[1]["prefix"]).resolve() == Path(sys.prefix).resolve()
    assert executed[1]["test_images"] == 8  # CAPTUNE_NOTEBOOK_FAST reached the kernel


def test_notebook_fine_tuning_raises_cider_on_the_test_split(executed: Executed) -> None:
    before, after = executed[1]["before"], executed[1]["after"]
    assert set(before) == set(after) >= {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert after["CIDEr"] > before["CIDEr"] + 0.1


def test_notebook_shows_the_data_and_the_captions_as_figures(executed: Executed) -> None:
    figures = [
        cell.source
        for cell in executed[0].cells
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert len(figures) == 2
    assert 'dataset.split("train")' in figures[0] and "caption_paths(" in figures[1]


def test_committed_notebook_has_no_outputs() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert notebook.metadata.kernelspec.name == "python3"
