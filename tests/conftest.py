import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests that use the lab (global names) take this lock for a whole module, so
# two test runs on one machine (and the demo and benchmarks) wait for each other.
from remus.scenario import LAB_LOCK as LAB_TEST_LOCK  # noqa: E402

# The tier of a test follows from its directory: `unit` (no root, no lab) or
# `integration` (the real kernel, root); the long ones of the second are marked
# `slow` in their modules. `make test-fast` runs unit and `integration and not
# slow`; `make test` runs everything.
TIERS = {"unit": pytest.mark.unit, "integration": pytest.mark.integration,
         "reliability": pytest.mark.integration}
TESTS = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before -m selects by these markers
def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(item.path).resolve()
        tier = TIERS.get(path.relative_to(TESTS).parts[0]) if path.is_relative_to(TESTS) else None
        if tier is not None:
            item.add_marker(tier)
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (real kernel, CRIU, netfilter)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def lab_lock() -> Iterator[None]:
    with open(LAB_TEST_LOCK, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def lab(lab_lock):
    from remus.lab import Lab

    lab = Lab()
    lab.down()  # leftovers of an earlier run
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


@pytest.fixture
def scenario(lab, tmp_path):
    """A fresh Scenario per test; every lab host is power-cycled afterwards."""
    from remus.scenario import Scenario

    made = []

    def make(**kw):
        sc = Scenario(lab, tmp_path / f"sc{len(made)}", **kw)
        made.append(sc)
        return sc

    try:
        yield make
    finally:
        for sc in made:
            sc.reset()
