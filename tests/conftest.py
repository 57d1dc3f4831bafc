"""Shared pytest fixtures: the location of ../shared and a skip when it is absent."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("FT_CADIS_SHARED", REPO.parent / "shared"))

# One intra-op thread per process: the suite runs multi-process jobs (gloo) and tiny models, where OpenMP threads
# oversubscribe the cores and slow everything down (measured up to 20x on 2 cores). OMP_NUM_THREADS overrides.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the checkout (or ``$FT_CADIS_SHARED``); tests that need it skip without it."""
    if not SHARED.is_dir():
        pytest.skip(f"reference data not found at {SHARED} (set FT_CADIS_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir: Path) -> Path:
    return shared_dir / "fixtures"
