"""The TOML config file: every command-line flag has a key of the same name.

Keys may be written with ``_`` or ``-`` (``max-recipients`` or
``max_recipients``). A bad file is refused whole, with the file, the line
and the reason, so a reload with a broken file keeps the old settings.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import fields

from .settings import RANGES, Settings, check_range

_KINDS = {f.name: f.type for f in fields(Settings)}
_NOT_IN_FILE = {"config_file", "mailbox_list", "sources"}


class ConfigFileError(Exception):
    pass


def load_config_file(path: str) -> dict:
    """The settings a file gives, checked; raises ConfigFileError."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigFileError(f"{path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigFileError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"{path}: {exc}") from None
    text = raw.decode("utf-8")
    values = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        where = f"{path}:{_line_of(text, key)}"
        if name == "domain":
            name = "domains"
        if name not in _KINDS or name in _NOT_IN_FILE:
            raise ConfigFileError(f"{where}: unknown setting {key!r}")
        values[name] = _check(name, value, where)
    return values


def _check(name: str, value: object, where: str) -> object:
    if name in RANGES:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigFileError(f"{where}: {name} must be an integer")
        reason = check_range(name, value)
        if reason:
            raise ConfigFileError(f"{where}: {reason}")
        return value
    if name == "domains":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise ConfigFileError(f"{where}: domains must be a list of domain names")
        return value
    if not isinstance(value, str):
        raise ConfigFileError(f"{where}: {name} must be a string")
    return value


def _line_of(text: str, key: str) -> int:
    match = re.search(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=", text, re.MULTILINE)
    return text.count("\n", 0, match.start()) + 1 if match else 1
