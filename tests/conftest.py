import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from mp import RankPool  # noqa: E402


def _pool(n: int):
    pool = RankPool(n)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def pool2():
    yield from _pool(2)


@pytest.fixture(scope="module")
def pool4():
    yield from _pool(4)


@pytest.fixture(scope="module")
def pool8():
    yield from _pool(8)
