"""Shared test settings: offline, deterministic, few threads."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

import pytest


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SDONNX_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set SDONNX_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def sdonnx_cache(tmp_path_factory, monkeypatch):
    """A per-session cache folder for what the loaders download or convert (modules opt in with usefixtures)."""
    monkeypatch.setenv("SDONNX_CACHE", str(tmp_path_factory.getbasetemp() / "sdonnx-cache"))


@pytest.fixture(scope="module")
def ldm_tool():
    """benchmarks/ldm_checkpoint.py, which writes LDM single-file checkpoints of diffusers folders."""
    import helpers

    return helpers.ldm_tool()
