"""Run the example notebooks and regenerate the README's pictures.

    python examples/make_pictures.py                  # all notebooks, full size (~15 min on 2 CPU cores)
    python examples/make_pictures.py 02_geometry      # only some notebooks
    python examples/make_pictures.py --small --no-save  # quick check, notebooks left untouched

Each notebook is executed headless (nbclient) with ``examples/`` as working
directory; its outputs are stored back into the ``.ipynb`` and every named
figure is written to ``examples/images/<name>.png`` (the plotting code lives
in ``examples/notebook_utils.py``). ``tests/test_notebooks.py`` uses
:func:`execute_notebook` with the small setting.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

EXAMPLES = Path(__file__).resolve().parent
REPO = EXAMPLES.parent
IMAGES = EXAMPLES / "images"


def notebooks() -> List[Path]:
    """The example notebooks, in order."""
    return sorted(EXAMPLES.glob("[0-9][0-9]_*.ipynb"))


class NotebookError(RuntimeError):
    """A cell raised, or left an error output."""


def execute_notebook(path: Path, small: bool, image_dir: Optional[Path] = None,
                     out_dir: Optional[Path] = None, timeout: int = 900):
    """Execute ``path`` in a fresh kernel and return ``(notebook, seconds)``.

    ``small`` sets ``PML_LOOP_NOTEBOOK_SMALL``; ``image_dir`` receives the
    named figures; ``out_dir`` is where notebooks that write experiments put
    them (default: a temporary folder). Raises :class:`NotebookError` if a
    cell fails or leaves an error output.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    notebook = nbformat.read(path, as_version=4)
    saved = dict(os.environ)
    os.environ["PML_LOOP_NOTEBOOK_SMALL"] = "1" if small else "0"
    for key, value in (("PML_LOOP_NOTEBOOK_IMAGES", image_dir), ("PML_LOOP_NOTEBOOK_OUT", out_dir)):
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = str(value)
    # The kernel imports pml_loop from this checkout even when it is not installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), saved.get("PYTHONPATH", "")) if p)
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(EXAMPLES)}})
    start = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as error:
        raise NotebookError(f"{path.name} failed:\n{error}") from None
    finally:
        os.environ.clear()
        os.environ.update(saved)
    seconds = time.perf_counter() - start
    errors = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.get("outputs", []) if output.get("output_type") == "error"]
    if errors:
        raise NotebookError(f"{path.name} left error outputs: {[e.get('ename') for e in errors]}")
    return notebook, seconds


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook names (stems) to run; default: all")
    parser.add_argument("--small", action="store_true", help="the tests' tiny setting")
    parser.add_argument("--no-save", action="store_true", help="leave the .ipynb files and images untouched")
    args = parser.parse_args(argv)
    import nbformat

    chosen = [p for p in notebooks() if not args.names or p.stem in args.names]
    missing = set(args.names) - {p.stem for p in chosen}
    if missing:
        parser.error(f"no such notebook: {sorted(missing)}")
    for path in chosen:
        print(f"{path.name} ...", flush=True)
        notebook, seconds = execute_notebook(path, args.small, None if args.no_save else IMAGES)
        print(f"{path.name}: {seconds:.0f} s", flush=True)
        if not args.no_save:
            nbformat.write(notebook, path)
    if not args.no_save:
        print(f"pictures in {IMAGES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
