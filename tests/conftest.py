import os
import sys

import pytest
import torch

# The suite is sized for 2 shared cores; keep intra-op threads predictable.
torch.set_num_threads(min(2, os.cpu_count() or 1))
sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipped without one "
                            "(benchmarks/gpu_check.sh runs them with -m cuda)")


def pytest_collection_modifyitems(config, items):
    import pytest

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def _installed_backends() -> tuple[str, ...]:
    import pml_loop.backend

    # The suite compiles numba's kernels itself: their one-time announcement
    # (tested on its own) would otherwise land in whichever test runs first.
    pml_loop.backend._announced = True
    return ("torch", "numba") if pml_loop.backend.numba_available() else ("torch",)


#: Every backend installed here; a test taking the ``backend`` fixture runs on each.
INSTALLED_BACKENDS = _installed_backends()


@pytest.fixture(params=INSTALLED_BACKENDS)
def backend(request):
    return request.param
