"""The documentation is executed, not just written: the site builds strictly, every Python
block of the README and the quickstart runs, and both notebooks run top to bottom."""

import os
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
from codeblocks import python_blocks
from nbclient import NotebookClient

ROOT = Path(__file__).parents[2]
NOTEBOOKS = ROOT / "docs" / "notebooks"
PAGES = [
    "README.md",
    "docs/quickstart.md",
    "docs/pipeline_parallel.md",
    "docs/serving.md",
    "docs/lora.md",
]
SKIP_REASONS = {
    "README.md": ["an outline of the API: docs/quickstart.md runs it whole"],
    "docs/serving.md": [
        "needs a running server",
        "needs a Hugging Face model directory with a sliding window",
        "needs a Hugging Face model directory",
    ],
}


QUICK_COMPILES = "--xla_backend_optimization_level=0"
"""The suite's quick compiles (tests/conftest.py), kept where the 8 fake devices are not."""


def _single_device_env() -> dict[str, str]:
    """This environment without the suite's 8 fake devices: what a reader's machine has."""
    return dict(os.environ, XLA_FLAGS=QUICK_COMPILES)


def test_site_builds_strictly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "api" / "index.html").exists()


@pytest.mark.parametrize("page", PAGES)
def test_page_code_blocks_run(page, tmp_path):
    blocks, skipped = python_blocks(ROOT / page)
    assert skipped == SKIP_REASONS.get(page, [])
    script = tmp_path / "page.py"
    script.write_text("\n\n".join(blocks))
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=_single_device_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def test_skip_markers_need_a_reason(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- doctest: skip (needs a TPU pod) -->\n```python\nraise SystemExit\n```\n"
        "text\n```python\nx = 1\n```\n"
    )
    assert python_blocks(page) == (["x = 1"], ["needs a TPU pod"])


@pytest.mark.parametrize("name", ["quickstart", "finetune_hf"])
def test_notebook_runs_and_matches_its_text_twin(name, monkeypatch):
    notebook = jupytext.read(NOTEBOOKS / f"{name}.ipynb")
    twin = jupytext.read(NOTEBOOKS / f"{name}.py")
    assert [(c.cell_type, c.source) for c in notebook.cells] == [
        (c.cell_type, c.source) for c in twin.cells
    ], f"{name}.ipynb and {name}.py differ: run `jupytext --sync docs/notebooks/{name}.py`"
    assert "colab.research.google.com" in notebook.cells[0].source
    monkeypatch.setenv("XLA_FLAGS", QUICK_COMPILES)  # the kernel starts with one CPU device
    executed = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    NotebookClient(
        executed, timeout=600, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}}
    ).execute()  # raises CellExecutionError naming the failing cell: the test's verdict
