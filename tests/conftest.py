"""Shared fixtures: where the real routing logs lie, and a seeded RNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
REALTRACES = REPO_ROOT.parent / "shared" / "realtraces"


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def realtraces() -> Path:
    if not REALTRACES.is_dir():
        pytest.skip(f"real routing logs not found at {REALTRACES}")
    return REALTRACES
