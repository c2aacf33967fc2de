"""The example notebooks run headless (small setting), and the committed ones
carry outputs and no errors.

Each notebook is executed in a fresh kernel by nbclient through
``examples/make_pictures.py``'s ``execute_notebook`` with
``PML_LOOP_NOTEBOOK_SMALL=1``; a failing cell fails the test (it is never
skipped: nbclient and ipykernel are in the ``test`` extra).
"""

import importlib.util
import time
from pathlib import Path

import nbformat
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# Each notebook and the pictures it writes (examples/images/<name>.png).
PICTURES = {
    "01_quickstart": ["quickstart_metrics", "quickstart_retrieval"],
    "02_geometry": ["geometry_cases", "negative_distances", "negative_distances_training"],
    "03_benchmark": ["benchmark_curves", "benchmark_projection"],
    "04_your_own_data": ["own_data_retrieval"],
}
EXPECTED = list(PICTURES)


def _make_pictures():
    spec = importlib.util.spec_from_file_location("make_pictures", EXAMPLES / "make_pictures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_pictures = _make_pictures()


def test_every_notebook_is_tested():
    assert [p.stem for p in make_pictures.notebooks()] == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_runs_small(name, tmp_path):
    start = time.perf_counter()
    notebook, _ = make_pictures.execute_notebook(
        EXAMPLES / f"{name}.ipynb", small=True, image_dir=tmp_path / "images", out_dir=tmp_path / "out",
        timeout=300,
    )
    elapsed = time.perf_counter() - start
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "a code cell did not run"
    # Every figure a notebook names was drawn (and written where asked).
    pictures = sorted(p.name for p in (tmp_path / "images").glob("*.png"))
    expected = sorted(f"{n}.png" for n in PICTURES[name])
    assert pictures == expected and all((tmp_path / "images" / p).stat().st_size > 5000 for p in pictures)
    print(f"{name}: {elapsed:.1f} s")


def test_committed_pictures_exist():
    for names in PICTURES.values():
        for n in names:
            png = (EXAMPLES / "images" / f"{n}.png").read_bytes()
            assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 400_000, n


@pytest.mark.parametrize("name", EXPECTED)
def test_committed_notebook_has_outputs_and_no_errors(name):
    notebook = nbformat.read(EXAMPLES / f"{name}.ipynb", as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), "commit the executed notebook"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert not [o for o in outputs if o.get("name") == "stderr" and "Traceback" in o.get("text", "")]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no picture in the outputs"
    # The committed run is the full-size one.
    assert "SMALL=True" not in "".join(o.get("text", "") for o in outputs)
    assert (EXAMPLES / f"{name}.ipynb").stat().st_size < 1_500_000
