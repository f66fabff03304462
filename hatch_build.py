"""Opt-in: the hot modules compiled ahead of time with mypyc.

    PREFORK_SMTPD_COMPILE=1 pip install .

Without the variable (the default, and every editable install) the wheel is
pure Python and the build needs nothing but hatchling. With it, the build
environment also gets mypy (whose mypyc does the compiling), setuptools
(which drives the C compiler) and what mypyc's type check needs (the
package's dependencies, the stubs of psutil), and the wheel carries the compiled modules
beside their sources: Python imports a compiled module before its ``.py``.
If the compiling fails (no C compiler, no Python headers), the build warns
and the wheel stays pure Python. bench/RESULTS.md, "Compiled ahead of
time", says what it saves; tests/test_compiled.py runs the session's tests
against the compiled modules.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import sysconfig
import tempfile
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

ENV = "PREFORK_SMTPD_COMPILE"
# The modules the event loop runs per command and per mail. The rest stays
# interpreted: it runs rarely, or does what mypyc cannot compile (stats.py
# makes properties in a loop; events.Reply subclasses bytes).
COMPILED = [
    "prefork_smtpd/session.py",
    "prefork_smtpd/commands.py",
    "prefork_smtpd/replies.py",
    "prefork_smtpd/chunking.py",
    "prefork_smtpd/smtputf8.py",
    "prefork_smtpd/policy.py",
    "prefork_smtpd/diskspace.py",
    "prefork_smtpd/worker.py",
]
# The same mypy the test suite pins (pyproject.toml, the test extra).
BUILD_REQUIRES = ["mypy==2.4.1", "setuptools>=70"]
# mypyc type-checks the modules before it compiles them, so the build
# environment also needs what they import: the package's dependencies and
# the stubs of the one without its own types (the test extra's ``types-*``).
# pip builds the wheel before it installs the dependencies: without these a
# fresh install would fail the check and fall back to pure Python.
STUBS_PREFIX = "types-"


def wanted() -> bool:
    return os.environ.get(ENV, "").strip() not in ("", "0")


class CustomBuildHook(BuildHookInterface):
    def dependencies(self) -> list[str]:
        if not wanted() or self.target_name != "wheel":
            return []
        metadata = self.metadata.core
        stubs = [r for r in metadata.optional_dependencies.get("test", []) if r.startswith(STUBS_PREFIX)]
        return [*BUILD_REQUIRES, *metadata.dependencies, *stubs]

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if not wanted() or self.target_name != "wheel":
            return
        if version == "editable":
            self.app.display_warning(f"{ENV}: an editable install runs the sources; nothing compiled")
            return
        self._work = tempfile.mkdtemp(prefix="prefork-smtpd-mypyc-")
        try:
            built = compile_modules(self.root, self._work)
        except BaseException as error:  # SystemExit from distutils when the compiler fails
            if isinstance(error, KeyboardInterrupt):
                raise
            self.app.display_warning(
                f"{ENV}: compiling failed ({type(error).__name__}: {error}); the wheel is pure Python"
            )
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        build_data["force_include"].update(built)

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        work = getattr(self, "_work", None)
        if work:
            shutil.rmtree(work, ignore_errors=True)


def compile_modules(root: str, work: str) -> dict[str, str]:
    """Compile COMPILED in ``work``; return {built file: its path in the wheel}."""
    from mypyc.build import mypycify  # only in the build environment the variable asks for
    from setuptools import Distribution

    os.environ["MYPY_CACHE_DIR"] = os.path.join(work, "mypy-cache")  # nothing left in the source folder
    here = os.getcwd()
    os.chdir(root)  # mypyc names modules by their paths, relative to the project
    try:
        extensions = mypycify(COMPILED, opt_level="3", target_dir=os.path.join(work, "c"), group_name="prefork_smtpd")
        distribution = Distribution({"name": "prefork_smtpd", "ext_modules": extensions})
        build_ext = distribution.get_command_obj("build_ext")
        build_ext.build_lib = os.path.join(work, "lib")
        build_ext.build_temp = os.path.join(work, "tmp")
        build_ext.ensure_finalized()
        build_ext.run()
    finally:
        os.chdir(here)
    lib = os.path.join(work, "lib")
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    found = glob.glob(os.path.join(lib, "**", "*" + suffix), recursive=True)
    built = {path: os.path.relpath(path, lib) for path in found}
    expected = {module[: -len(".py")] + suffix for module in COMPILED}
    missing = expected - set(built.values())
    if missing:
        raise RuntimeError(f"not built: {sorted(missing)}")
    print(f"{ENV}: compiled {len(COMPILED)} modules for {sys.implementation.cache_tag}", file=sys.stderr)
    return built
