"""Fixtures: real servers started per test and stopped after it."""

from __future__ import annotations

import os
import signal

import pytest

from harness import Server


def pytest_configure(config):
    # A suite started in the background by a non-interactive shell inherits
    # SIGINT ignored, and so would every program a test starts; the tests that
    # stop a program with SIGINT need it back to the default.
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_runtest_setup(item):
    marker = item.get_closest_marker("root")
    if marker and os.geteuid() != 0:
        pytest.skip(f"needs root: {marker.args[0] if marker.args else 'root only'}")


@pytest.fixture
def start_server(tmp_path):
    """Factory: start_server(*flags, workers=2) -> a running Server; stopped after."""
    servers: list[Server] = []

    def start(*args: str, **kw) -> Server:
        root = tmp_path / f"server{len(servers)}"
        root.mkdir()
        server = Server(root, *args, **kw)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


@pytest.fixture
def server(start_server):
    return start_server()
