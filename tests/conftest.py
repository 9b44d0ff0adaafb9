from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def fsdd_dir() -> Path:
    """The real FSDD, found as the recipes find it (:func:`audioclf.datasets.default_fsdd_dir`).

    Absent: the test skips. Named by ``AUDIOCLF_FSDD_DIR`` but not there: the test fails
    (CI sets the variable, and must not pass without the data).
    """
    from audioclf.datasets import default_fsdd_dir

    path = default_fsdd_dir()
    if path is None:
        pytest.skip("FSDD not found: set AUDIOCLF_FSDD_DIR or place it at ../shared/datasets/fsdd")
    if not (path / "recordings").is_dir():
        pytest.fail(f"AUDIOCLF_FSDD_DIR={path} holds no FSDD copy (no recordings/ folder)", pytrace=False)
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny networks gain little from a second thread and lose much when the cores are busy.

    Use per module: ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
