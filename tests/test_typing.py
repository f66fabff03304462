"""mypy checks the package (its settings in pyproject.toml): CI fails on a type error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def mypy(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", *args],
        cwd=cwd, capture_output=True, text=True, timeout=600, check=False, env={**os.environ, **env},
    )


@pytest.mark.slow
def test_mypy_finds_no_error_in_the_package():
    result = mypy()  # the files and options of [tool.mypy]
    assert result.returncode == 0, result.stdout + result.stderr


_USES_SETTINGS = '''
from prefork_smtpd.settings import Settings

settings = Settings(port=25)
reveal_type(settings.port)
reveal_type(settings.submission_port)
reveal_type(settings.domains)
reveal_type(settings.require_tls)
settings.no_such_setting
Settings(port="25")
'''


@pytest.mark.slow
def test_mypy_sees_each_setting_with_its_type(tmp_path):
    # Settings used to be built at run time (make_dataclass): every field was Any to mypy.
    (tmp_path / "uses_settings.py").write_text(_USES_SETTINGS)
    result = mypy("--config-file", str(ROOT / "pyproject.toml"), "uses_settings.py", cwd=tmp_path, MYPYPATH=str(ROOT))
    lines = result.stdout.splitlines()
    revealed = [line.split("Revealed type is ")[1] for line in lines if "Revealed type is" in line]
    assert revealed == ['"int"', '"int | None"', '"list[str]"', '"bool"'], lines
    assert any('has no attribute "no_such_setting"' in line for line in lines), lines
    assert any('Argument "port" to "Settings" has incompatible type "str"' in line for line in lines), lines
