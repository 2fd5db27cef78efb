"""The notebooks of colabs/: saved without outputs, up to date, and running in fast mode.

Each notebook is executed top to bottom by nbclient in a fresh ``python3``
kernel with ``EFFFORMER_FAST=1`` (tiny sizes, few steps), one CPU device
(as in Colab, not the 8 simulated devices of the other tests), a temporary
TFDS data directory and a temporary working directory; any error fails the
test with the cell that raised it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
COLABS = REPO / "colabs"


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_notebooks", COLABS / "_build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


builder = _load_builder()
NOTEBOOKS = builder.NOTEBOOKS


def test_every_notebook_is_listed():
    assert sorted(p.stem for p in COLABS.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_saved_without_outputs_and_matches_its_source(name):
    path = COLABS / f"{name}.ipynb"
    notebook = nbformat.read(path, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells, f"{path.name} has no code cells"
    for cell in code_cells:
        assert cell.outputs == [], f"{path.name}: a code cell holds outputs:\n{cell.source[:200]}"
        assert cell.execution_count is None, f"{path.name}: a code cell has an execution count"
    assert path.read_text() == builder.render(name), (
        f"{path.name} differs from colabs/source/{name}.py: run "
        f".venv/bin/python colabs/_build_notebooks.py {name}"
    )


def test_first_cells_describe_the_notebook_and_set_it_up():
    for name in NOTEBOOKS:
        cells = builder.build(name).cells
        intro, setup = cells[0], cells[2]
        assert intro.cell_type == "markdown" and intro.source.startswith("# ")
        assert "EFFFORMER_FAST=1" in intro.source and "**Time**" in intro.source
        assert setup.cell_type == "code" and "google.colab" in setup.source


def test_builder_refuses_unknown_cell_markers():
    with pytest.raises(ValueError, match="Unknown cell marker"):
        builder._cells("# %% [raw]\nx = 1\n")
    with pytest.raises(ValueError, match="must be comments"):
        builder._cells("# %% [markdown]\nnot a comment\n")


@pytest.fixture(scope="module")
def shared_dirs(tmp_path_factory):
    """A TFDS data dir and a JAX compilation cache shared by the notebooks of one session."""
    return tmp_path_factory.mktemp("tfds"), tmp_path_factory.mktemp("jax_cache")


def _kernel_env(shared_dirs: tuple[Path, Path], tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    # One CPU device, as a Colab CPU runtime has (conftest asks for 8 simulated ones).
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device" not in f]
    # The other flags are tests/conftest.py's fast-compilation ones: compilation dominates a
    # fast-mode run, and the test checks that the notebooks run, not their speed (the
    # timing notebook's fast-mode numbers mean nothing).
    env["XLA_FLAGS"] = " ".join(flags)
    env.update(
        EFFFORMER_FAST="1",
        JAX_PLATFORMS="cpu",
        TMPDIR=str(tmp_path),  # the notebooks' tempfile workdirs go under pytest's tmp_path
        TFDS_DATA_DIR=str(shared_dirs[0]),
        # Programs compiled twice (the trainer's eval step, then evaluate()'s) compile once.
        JAX_COMPILATION_CACHE_DIR=str(shared_dirs[1]),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    return env


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_fast_mode(name, tmp_path, shared_dirs):
    from nbclient import NotebookClient

    notebook = nbformat.read(COLABS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=300,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    # nbclient raises CellExecutionError naming the cell and the traceback on any error.
    client.execute(env=_kernel_env(shared_dirs, tmp_path))
