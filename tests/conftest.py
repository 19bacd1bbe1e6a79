"""Test setup: Triton interpreter on machines without a GPU, the ``gpu`` / ``slow`` / ``eval_data`` markers and
the ``eval_data`` fixture.

Tests that read the evaluation videos, images or captions (``anyflow_eval``, not shipped with the repository)
carry ``@pytest.mark.eval_data`` or take the ``eval_data`` fixture (the folder's path); both skip, naming the
data and ``ANYFLOW_EVAL_DATA``, when :func:`anyflow.training.data.eval_data_root` finds no folder.
"""

import os

from pathlib import Path
from typing import Optional

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Must happen before any @triton.jit decorator runs, i.e. before test modules import anyflow.kernels.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _eval_data() -> tuple[Optional[Path], str]:
    """The evaluation-data folder (or ``None``) and the skip reason to give when it is absent."""
    from anyflow.training.data import EVAL_DATA_ENV, eval_data_root

    try:
        return eval_data_root(), ""
    except FileNotFoundError as exc:
        return None, f"needs the evaluation data (anyflow_eval), which the repository does not ship: {exc}"


@pytest.fixture(scope="session")
def eval_data() -> Path:
    """The ``anyflow_eval`` folder; skips the test when it is absent."""
    root, reason = _eval_data()
    if root is None:
        pytest.skip(reason)
    return root


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: opt-in (--runslow or ANYFLOW_RUN_SLOW=1)")
    config.addinivalue_line("markers", "eval_data: reads the evaluation data (skipped without it; ANYFLOW_EVAL_DATA)")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--runslow") or os.environ.get("ANYFLOW_RUN_SLOW") == "1"
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow or set ANYFLOW_RUN_SLOW=1")
    skip_eval = None
    if any(item.get_closest_marker("eval_data") for item in items):
        root, reason = _eval_data()
        skip_eval = None if root is not None else pytest.mark.skip(reason=reason)
    for item in items:
        if skip_eval is not None and item.get_closest_marker("eval_data"):
            item.add_marker(skip_eval)
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
