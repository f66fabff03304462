"""The compiled build (``PREFORK_SMTPD_COMPILE=1 pip install .``) answers as the sources do.

Builds the wheel with the hot modules compiled by mypyc (hatch_build.py),
installs it into a temporary virtual environment and runs the session's
sans-IO tests, its property tests and the worker's tests (some of which
start real servers: with that environment's Python, so the compiled code)
against it. mypyc checks types at run time and forbids what the
interpreter allows (monkeypatched methods, plain class attributes read
through a subclass, values cast to a type they are not): this is where such
a change to the sources shows.

Needs a C compiler and the Python headers, as CI has (run-tests installs
them): without them the test fails, saying so, rather than skip.
"""

from __future__ import annotations

import pytest


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_compiled_modules_pass_the_session_and_worker_tests(compiled_run):
    # Built and run on a thread since collection ended (tests/compiled_build.py).
    compiled_run.join()
    if compiled_run.error is not None:
        raise compiled_run.error
