"""Test setup: Triton interpreter on machines without a GPU, and the ``gpu`` / ``slow`` markers."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Must happen before any @triton.jit decorator runs, i.e. before test modules import anyflow.kernels.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: opt-in (--runslow or ANYFLOW_RUN_SLOW=1)")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--runslow") or os.environ.get("ANYFLOW_RUN_SLOW") == "1"
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow or set ANYFLOW_RUN_SLOW=1")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
