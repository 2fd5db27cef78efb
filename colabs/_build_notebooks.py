"""Builds the notebooks of colabs/ from their reviewable sources in colabs/source/.

    .venv/bin/python colabs/_build_notebooks.py          # rewrite every colabs/<name>.ipynb
    .venv/bin/python colabs/_build_notebooks.py --check  # exit 1 if a notebook is out of date

A source is a Python file in the "percent" format: a line ``# %%`` starts a
code cell, ``# %% [markdown]`` a markdown cell whose lines are comments (the
leading ``# `` is removed), and ``# %% [setup]`` stands for the two setup cells
every notebook shares (SETUP_MARKDOWN and SETUP_CODE below). Each source
starts with its own introduction (what it shows, how long it takes, the fast
mode), then the setup.

The notebooks are written without outputs (execution counts None), so the
repository never holds results that contradict the code; the test suite
(tests/test_colabs.py) checks that, checks that every notebook equals what
this script builds from its source, and executes each one in fast mode.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

COLABS = Path(__file__).resolve().parent
SOURCES = COLABS / "source"
NOTEBOOKS = ("quickstart", "attention_maps", "long_sequences", "mamba_generation")

SETUP_MARKDOWN = """\
## Setup

**In Colab**: this notebook needs a copy of the effformer repository in
`/content/effformer` (the project has no public URL yet). Either upload a zip of
the repository with the Files pane and run `!unzip -q effformer.zip -d /content`,
or `!git clone <URL of your copy> /content/effformer`. The next cell then runs
`pip install -e /content/effformer` (a few minutes: JAX, Flax, Optax, Orbax, Grain
and TFDS). A CPU runtime is enough.

**Elsewhere** (a local Jupyter, the test suite) the cell uses the checkout this
notebook sits in: effformer is imported if installed (`pip install -e .` in the
repository), else the repository root is put on `sys.path`.

**Fast mode**: with the environment variable `EFFFORMER_FAST=1` the notebook
shrinks its steps and sizes so that it runs in seconds; the test suite executes
every notebook this way. The numbers and pictures it then shows are not
meaningful; run without it for the real thing."""

SETUP_CODE = """\
import os
import sys
from pathlib import Path

# EFFFORMER_FAST=1: tiny sizes and few steps (the test suite's mode); unset for real results.
FAST = os.environ.get("EFFFORMER_FAST") == "1"

if "google.colab" in sys.modules:
    import subprocess

    CHECKOUT = Path("/content/effformer")
    if not (CHECKOUT / "pyproject.toml").is_file():
        raise FileNotFoundError(
            f"No effformer repository in {CHECKOUT}: upload or clone it there first "
            "(see the Setup cell above)."
        )
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", str(CHECKOUT)], check=True)
    # The running kernel does not read the .pth file the editable install just wrote.
    sys.path.insert(0, str(CHECKOUT))
else:
    try:
        import effformer  # noqa: F401  (installed with pip install -e .)
    except ImportError:
        here = Path.cwd().resolve()
        roots = [p for p in (here, *here.parents) if (p / "effformer" / "__init__.py").is_file()]
        if not roots:
            raise ImportError(
                f"effformer is not installed and no parent of {here} holds the repository: "
                "run `pip install -e .` in the repository, or start Jupyter inside it."
            ) from None
        sys.path.insert(0, str(roots[0]))

import effformer

print(f"effformer {effformer.__version__} from {Path(effformer.__file__).parent}; fast mode: {FAST}")"""


def _cells(text: str) -> list[tuple[str, str]]:
    """[(kind, source)] of a percent-format file; kind is "code", "markdown" or "setup"."""
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("# %%"):
            marker = line[4:].strip()
            kind = {"": "code", "[markdown]": "markdown", "[setup]": "setup"}.get(marker)
            if kind is None:
                raise ValueError(
                    f"Unknown cell marker {line!r} (expected '# %%', "
                    "'# %% [markdown]' or '# %% [setup]')."
                )
            cells.append((kind, []))
        elif not cells:
            if line.strip():
                raise ValueError(f"Text before the first cell marker: {line!r}.")
        elif cells[-1][0] == "markdown":
            if line and not line.startswith("#"):
                raise ValueError(f"Markdown cell lines must be comments, got {line!r}.")
            cells[-1][1].append(line[2:] if line.startswith("# ") else line[1:])
        else:
            cells[-1][1].append(line)
    return [(kind, "\n".join(lines).strip("\n")) for kind, lines in cells]


def build(name: str) -> nbformat.NotebookNode:
    """The notebook ``name`` built from ``colabs/source/<name>.py``, without outputs."""
    notebook = nbformat.v4.new_notebook()
    for kind, source in _cells((SOURCES / f"{name}.py").read_text()):
        if kind == "setup":
            notebook.cells.append(nbformat.v4.new_markdown_cell(SETUP_MARKDOWN))
            notebook.cells.append(nbformat.v4.new_code_cell(SETUP_CODE))
        elif kind == "markdown":
            notebook.cells.append(nbformat.v4.new_markdown_cell(source))
        else:
            notebook.cells.append(nbformat.v4.new_code_cell(source))
    # Stable cell ids, so rebuilding an unchanged source gives an identical file.
    for index, cell in enumerate(notebook.cells):
        cell["id"] = f"{name}-{index}"
    notebook.metadata = {
        "colab": {"provenance": []},
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    nbformat.validate(notebook)
    return notebook


def render(name: str) -> str:
    """The .ipynb text of notebook ``name``."""
    return nbformat.writes(build(name)) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"some of {NOTEBOOKS} (default: all)")
    parser.add_argument("--check", action="store_true", help="only report stale notebooks")
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(NOTEBOOKS))
    if unknown:
        parser.error(f"names must be among {NOTEBOOKS}, got {unknown}")
    stale = []
    for name in args.names or NOTEBOOKS:
        path = COLABS / f"{name}.ipynb"
        text = render(name)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print(f"Out of date (run colabs/_build_notebooks.py): {', '.join(stale)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
