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
