"""Fixtures for the serving tests: a tiny model folder with adapters, and a live server on loopback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.serve.live import start_server
from tests.serve.tiny import build


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "load: bounded load test on loopback (deselect with -m 'not load')")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """(model folder, {adapter name: folder}) for the tiny Llama; adapters live under one root."""
    return build(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def server(tiny, tmp_path_factory):
    """One server for the HTTP tests: alpha, beta and gamma loaded; delta loadable at run time."""
    model_dir, adapters = tiny
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = start_server(model_dir, {n: adapters[n] for n in ("alpha", "beta", "gamma")},
                       adapters["alpha"].parent, log, "--log-level", "info")  # a request log line each
    yield srv
    srv.process.terminate()
    try:
        srv.process.wait(10)
    except subprocess.TimeoutExpired:
        srv.process.kill()
