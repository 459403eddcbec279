"""Test configuration shared by every test file.

Without a CUDA device the Triton backend runs under its interpreter (TRITON_INTERPRET=1),
which must be set before triton is imported; with a device the compiled kernels are tested.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture
def generator():
    """A seeded CPU generator: every test draws fresh but reproducible inputs."""
    return torch.Generator().manual_seed(1234)


# ----------------------------------------------------------------------------- markers

SLOW_OPTION = "--slow"


def pytest_addoption(parser):
    parser.addoption(
        SLOW_OPTION,
        action="store_true",
        default=False,
        help="also run the tests marked slow (minutes each on a 2-core CPU); CI runs them",
    )


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` are deselected (not skipped) unless pytest gets ``--slow``."""
    if config.getoption(SLOW_OPTION):
        return
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item.get_closest_marker("slow") is None]


@pytest.fixture(autouse=True)
def _cuda_emulation_when_marked(request):
    """In tests marked ``cuda_emulation``, backend="native" on CPU tensors runs the CUDA kernels
    compiled for the CPU emulation (tests/cuda_emulation; docs/native.md)."""
    if request.node.get_closest_marker("cuda_emulation") is None:
        yield
        return
    from cuda_emulation import backend as emulation

    missing = emulation.missing_toolchain()
    if missing:
        pytest.skip(f"the CUDA emulation needs {missing}")
    with emulation.installed():
        yield
