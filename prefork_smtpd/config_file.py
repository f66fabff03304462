"""The TOML config file: every command-line flag has a key of the same name.

Keys may be written with ``_`` or ``-`` (``max-recipients`` or
``max_recipients``); the keys and their checks come from
``settings.REGISTRY``. A bad file is refused whole, with the file, the line
and the reason, so a reload with a broken file keeps the old settings.
"""

from __future__ import annotations

import re
import tomllib

from .settings import BY_NAME, TOML_KEYS
from .textfile import read_regular_file


class ConfigFileError(Exception):
    pass


def read_toml(path: str) -> tuple[dict, str]:
    """The TOML file at ``path``, parsed, and its text; raises ConfigFileError
    naming the file. The server and the command-line tools read it alike: a
    regular file only (a FIFO or a device there would hang the reader)."""
    try:
        raw = read_regular_file(path)
    except OSError as exc:
        raise ConfigFileError(f"{path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
        return tomllib.loads(text), text
    except UnicodeDecodeError as exc:
        raise ConfigFileError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"{path}: {exc}") from None


def load_config_file(path: str) -> dict:
    """The settings a file gives, checked; raises ConfigFileError."""
    data, text = read_toml(path)
    values = {}
    spelled: dict[str, str] = {}  # setting -> the key that gave it
    for key, value in data.items():
        where = f"{path}:{_line_of(text, key)}"
        name = TOML_KEYS.get(key.replace("-", "_"))
        if name is None:
            raise ConfigFileError(f"{where}: unknown setting {key!r}")
        if name in spelled:
            # TOML sees two keys; which one won would depend on their order.
            raise ConfigFileError(f"{where}: {name} given twice (as {spelled[name]!r} and {key!r})")
        spelled[name] = key
        values[name], reason = BY_NAME[name].check_file_value(value)
        if reason:
            raise ConfigFileError(f"{where}: {reason}")
    return values


def _line_of(text: str, key: str) -> int:
    """The line that gives ``key``: ``key = ...``, a dotted ``key.x = ...``
    or a table ``[key]`` / ``[key.x]``."""
    # [ \t], not \s: \s would reach back over blank lines and count them.
    quoted = rf"[\"']?{re.escape(key)}[\"']?"
    match = re.search(rf"^[ \t]*(?:{quoted}[ \t]*[=.]|\[\[?[ \t]*{quoted}[ \t]*[\].])", text, re.MULTILINE)
    return text.count("\n", 0, match.start()) + 1 if match else 1
