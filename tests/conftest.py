"""Suite-wide settings."""
import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """Small convolutions on a busy 2-core box: with 2 threads OpenMP spin-waiting makes them up to
    10x slower; one thread is immune to that (and keeps timings out of the tests' way).
    MARGINFACE_TEST_THREADS sets another count (.ci/isa-matrix runs the suite with 2 as well)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("MARGINFACE_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(threads)
