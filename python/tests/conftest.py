"""pytest configuration: the `cuda` marker (tests skipped where torch sees no GPU)."""

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped where torch sees none)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device visible to torch")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
