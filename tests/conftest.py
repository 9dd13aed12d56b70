"""Shared fixtures: the generated demo dataset and paths to the real data in ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def shared(*parts: str) -> Path:
    """A path under ../shared/data; skip the test when that folder is not there."""
    path = SHARED_DATA.joinpath(*parts)
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (it comes with the project's shared/ folder)")
    assert path.exists(), f"{path} missing from the shared data"
    return path


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The demo dataset (without models), generated once per test session."""
    from bidsenc.synth import make_demo

    root = tmp_path_factory.mktemp("demo")
    truth = make_demo(root, seed=0, with_models=False)
    return root, truth
