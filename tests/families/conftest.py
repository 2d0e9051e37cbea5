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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Record each matrix test's outcome per family and link (tests/families/matrix.py)."""
    from tests.families import matrix

    outcome = yield
    report = outcome.get_result()
    link = matrix.LINK_OF.get(getattr(item, "originalname", item.name))
    family = getattr(item, "callspec", None) and item.callspec.params.get("family")
    if link is None or family is None or (report.when != "call" and not report.skipped):
        return
    matrix.OUTCOMES.setdefault((family, link), []).append(report.outcome)
