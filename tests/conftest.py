import os

# Triton kernels run on CPU tensors through the interpreter; it must be chosen before triton is imported.
try:
    import torch
    _cuda = torch.cuda.is_available()
except ImportError:
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = "cuda" if _cuda else "cpu"

# The tiny image world's fixtures (world, one_thread) for every test module that names them.
pytest_plugins = ["adapt_world"]


def pytest_collection_modifyitems(config, items):
    if _cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _one_triton_tile_config():
    """On a GPU the tests check correctness, not tuning: each Triton kernel runs one tile configuration
    (a single-stage one where there is one, which fits any bank) instead of autotuning every odd shape."""
    if not _cuda:
        yield
        return
    from atlas_fast.kernels import atlas_linear as kernels
    tuners = (kernels._fwd, kernels._dx, kernels._dc)
    saved = [t.configs for t in tuners]
    for t in tuners:
        t.configs = [c for c in t.configs if c.num_stages == 1][:1] or t.configs[:1]
    yield
    for t, configs in zip(tuners, saved):
        t.configs = configs
