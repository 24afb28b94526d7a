from __future__ import annotations

from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def _bench_root() -> Path:
    # tests/cloud/detection/conftest.py -> repo root is parents[3]; data sits beside the repo.
    repo = Path(__file__).resolve().parents[3]
    return (repo / ".." / "shared" / "benchmarks").resolve()


@pytest.fixture(scope="session")
def bench_root() -> Path:
    root = _bench_root()
    if not root.is_dir():
        pytest.skip(f"shared benchmark data not found at {root}")
    return root
