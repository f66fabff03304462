"""The compiled build (``PREFORK_SMTPD_COMPILE=1 pip install .``), built and
tested on a thread beside the rest of the suite.

Building the wheel with mypyc and running the session and worker tests
against it takes minutes of mostly one core, while the rest of the suite
mostly waits on servers and clients: run side by side, the two take little
more than the longer one. conftest.py starts the thread once collection is
done (when tests/test_compiled.py is among the tests to run) and puts that
test last; the test waits for the thread and raises what it found. See
tests/test_compiled.py for what is checked and why.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sysconfig
import tempfile
import threading
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPILED = ["session", "commands", "replies", "chunking", "smtputf8", "policy", "diskspace", "worker"]
TESTS = [
    "tests/test_session.py", "tests/test_session_events.py", "tests/test_session_framing.py",
    "tests/test_session_limits.py", "tests/test_session_mutants.py", "tests/test_session_properties.py",
    "tests/test_session_refusal_log.py", "tests/test_session_sequence.py", "tests/test_session_tls_auth.py",
    "tests/test_commands.py", "tests/test_chunking.py", "tests/test_replies.py", "tests/test_smtputf8.py",
    "tests/test_addresses.py", "tests/test_policy.py", "tests/test_worker_mutants.py",
    "tests/test_server.py", "tests/test_framing_server.py", "tests/test_bdat_server.py",
]
# Not here: tests/test_worker_events.py calls SMTPConnection's methods on
# stand-in objects (SimpleNamespace), which a compiled method refuses (it
# checks the type of self); the servers started by the tests above run the
# compiled worker instead.


def compiler_missing() -> str | None:
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        return f"no C compiler ({compiler}): install gcc (run-tests does)"
    headers = sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(headers, "Python.h")):
        return f"no Python headers in {headers}: install python3-dev (run-tests does)"
    return None



class CompiledRun(threading.Thread):
    """build_and_test in a folder of its own; ``error`` is what it raised."""

    def __init__(self) -> None:
        super().__init__(name="compiled build", daemon=True)
        self.folder = Path(tempfile.mkdtemp(prefix="prefork-smtpd-compiled-"))
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            build_and_test(self.folder)
        except BaseException as exc:  # handed to the test, which raises it
            self.error = exc

    def remove_folder(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def build_and_test(tmp_path: Path) -> None:
    missing = compiler_missing()
    assert missing is None, missing
    assert (ROOT / "pyproject.toml").exists(), f"the project's sources are not beside the tests ({ROOT})"

    # Built as a user's first install builds it: from an environment holding
    # none of the dependencies yet (pip builds the wheel before it installs
    # them), in pip's isolated build environment. Built from this one, the
    # type check before the compiling would find the dependencies here.
    builder = tmp_path / "builder"
    venv.create(builder, with_pip=True)
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [str(builder / "bin" / "python"), "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(wheels), str(ROOT)],
        env={**os.environ, "PREFORK_SMTPD_COMPILE": "1"}, capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    said = build.stdout + build.stderr
    assert "compiling failed" not in said, said[-6000:]
    (wheel,) = glob.glob(str(wheels / "prefork_smtpd-*.whl"))
    assert not wheel.endswith("-none-any.whl"), f"a pure-Python wheel: {wheel}\n{said[-6000:]}"

    # A fresh environment with the compiled package; the test packages
    # (pytest, hypothesis, ...) and the package's dependencies come from
    # this one, after its own site-packages, so its prefork_smtpd is the
    # compiled one.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", wheel], capture_output=True, text=True,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    # Only now: pip, seeing this environment's prefork_smtpd (as run-tests
    # installs it, not editable) through the .pth, would take the compiled
    # wheel as installed already.
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "outer-packages.pth").write_text("".join(f"{path}\n" for path in sorted(ours)))

    # Every module meant to be compiled is, in the package that the tests import.
    where = subprocess.run(
        [python, "-P", "-c", "import importlib; print('\\n'.join(importlib.import_module("
         "'prefork_smtpd.' + m).__file__ for m in " + repr(COMPILED) + "))"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert where.returncode == 0, where.stderr[-3000:]
    files = where.stdout.split()
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    assert len(files) == len(COMPILED) and all(f.startswith(site) and f.endswith(suffix) for f in files), files

    tests = subprocess.run(
        [python, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *TESTS],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert tests.returncode == 0, tests.stdout[-6000:] + tests.stderr[-3000:]
    assert " passed" in tests.stdout.splitlines()[-1], tests.stdout[-3000:]
