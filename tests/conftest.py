import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# transform's graphs run as rewritten FX graphs in the tests of numbers (float64 comparisons see
# the rewrite itself, and compile in milliseconds); test_transform_inductor.py and the backend
# tests run them through inductor. Subprocesses spawned by tests inherit this.
os.environ.setdefault("SVGD_FX_CODEGEN", "fx")
# Under pytest-xdist (the default, see pyproject.toml) the cores are shared among the workers.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts from an empty Dynamo cache, so no compiled graph leaks between tests."""
    torch._dynamo.reset()
    yield
