"""The family matrix runs tiny models: one torch thread each (two threads only wait on each other at this
size, and on a busy machine a spinning second thread costs milliseconds per 64-wide matmul)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
