import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def find_fsdd() -> Path | None:
    """AUDIOCLF_FSDD_DIR, else ../shared/datasets/fsdd beside the checkout."""
    candidates = [os.environ.get("AUDIOCLF_FSDD_DIR"), REPO.parent / "shared" / "datasets" / "fsdd"]
    for c in candidates:
        if c and (Path(c) / "recordings").is_dir():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def fsdd_dir() -> Path:
    path = find_fsdd()
    if path is None:
        pytest.skip("FSDD not found: set AUDIOCLF_FSDD_DIR or place it at ../shared/datasets/fsdd")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep every test's waveform cache out of the user's home folder."""
    monkeypatch.setenv("AUDIOCLF_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def pytest_collection_modifyitems(config, items):
    import importlib.util

    cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        cuda = torch.cuda.is_available()
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not cuda:
            item.add_marker(skip)
