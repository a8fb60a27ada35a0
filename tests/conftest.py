import os
import sys

import pytest
import torch

# tests import their helpers (dist_utils, tiny_models) by plain name
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="module", autouse=True)
def _threads():
    """At most 2 threads per test process (CI has 2 cores; multi-process tests fork several)."""
    old = torch.get_num_threads()
    torch.set_num_threads(min(old, 2))
    yield
    torch.set_num_threads(old)
