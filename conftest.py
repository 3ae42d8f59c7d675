"""Repository-wide pytest set-up: tests marked ``gpu`` are skipped where CUDA is absent."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the mark, not any node named "gpu"
            item.add_marker(skip)
