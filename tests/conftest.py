"""Shared test fixtures: where ../shared lives, and small helpers every test module uses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("TOPO_SCHED_SHARED", REPO_ROOT.parent / "shared")).resolve()
FIXTURES = SHARED_DIR / "fixtures"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED_DIR.is_dir():
        pytest.fail(f"shared fixtures not found at {SHARED_DIR}; set TOPO_SCHED_SHARED")
    return SHARED_DIR


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir: Path) -> Path:
    return shared_dir / "fixtures"
