import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (real kernel, CRIU, netfilter)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)
