import os
import sys

# Inductor compiles in this process, never in a worker pool: a pool started by one test (a compile in
# the pytest process) is inherited half-dead by the ranks later tests fork, and they wait on it forever.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

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
