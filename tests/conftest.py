"""Fixtures: real servers started per test and stopped after it."""

from __future__ import annotations

import os
import signal

import pytest

from compiled_build import CompiledRun
from harness import Server

COMPILED_TEST = "test_compiled.py"
COMPILED_RUN = pytest.StashKey[CompiledRun]()


def pytest_configure(config):
    # A suite started in the background by a non-interactive shell inherits
    # SIGINT ignored, and so would every program a test starts; the tests that
    # stop a program with SIGINT need it back to the default.
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config, items):
    # The compiled build runs beside the suite from the end of collection
    # (tests/compiled_build.py): its test, which waits for it, goes last.
    items.sort(key=lambda item: item.path.name == COMPILED_TEST)


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    if any(item.path.name == COMPILED_TEST for item in session.items):
        run = CompiledRun()
        session.config.stash[COMPILED_RUN] = run
        run.start()


@pytest.fixture
def compiled_run(pytestconfig):
    """The compiled build's thread, started when collection ended."""
    run = pytestconfig.stash[COMPILED_RUN]
    yield run
    if run.error is None:
        run.remove_folder()  # kept when it failed, to look at


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
