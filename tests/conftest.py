import os

import pytest

from tests.hooks import LONG

# Tests never reach a hub: every model and data set comes from local files or packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``long`` (minutes each: real-model training curves, multi-GiB data) run only
    with GRADTUNE_LONG_TESTS=1 (``make test-long``): ``make test`` must fit CI's 12 minutes."""
    if LONG:
        return
    skip = pytest.mark.skip(reason="long test: GRADTUNE_LONG_TESTS=1 (make test-long) runs it")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)
