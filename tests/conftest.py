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
    """The raw-layout demo dataset (no models): quick to fit, BOLD in raw BIDS; generated once per session."""
    from bidsenc.synth import make_demo

    root = tmp_path_factory.mktemp("demo")
    truth = make_demo(root, seed=0, with_models=False, layout="raw")
    return root, truth


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> str:
    """A tiny causal LM saved locally; its path works as ``--feature lm:PATH``."""
    from bidsenc.synth.models import make_causal_lm_family

    root = tmp_path_factory.mktemp("tiny-lm")
    texts = ["one two three four five six seven eight nine ten hello world story words"] * 20
    return str(make_causal_lm_family(root, texts, sizes=("tiny",))[0]["path"])
