"""``prefork-smtpd-users``: add, change, delete and list SMTP AUTH users.

    prefork-smtpd-users add alice@smtpd.com          # asks for the password twice
    echo 's3cret' | prefork-smtpd-users add bob --stdin
    prefork-smtpd-users passwd alice@smtpd.com --scheme BLF-CRYPT
    prefork-smtpd-users delete bob
    prefork-smtpd-users list

The file is Dovecot's passwd-file format (see ``prefork_smtpd.users``), so
Dovecot can read it too. Edits touch only the line of the user named: every
comment, blank line and other user's line (Dovecot's uid, home and extra
fields included) is kept byte for byte. The new file replaces the old one
atomically (a temporary file in the same folder, fsync, rename, fsync of the
folder), so the server, Dovecot or a crash never sees half a file; it keeps
the old file's owner and group where allowed, with mode 0640 (the hashes
must not be world-readable). Two edits at once are serialised by a lock on
the folder, so neither loses the other's change.

Names are stored in lowercase: Dovecot lowercases login names by default
(``auth_username_format = %Lu``), so a capital in the file would never match.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import getpass
import os
import sys
import tempfile
from collections.abc import Iterator

from prefork_smtpd import __version__
from prefork_smtpd.config_file import ConfigFileError, read_toml
from prefork_smtpd.textfile import read_regular_file
from prefork_smtpd.users import (
    DEFAULT_SCHEME,
    SCHEMES,
    UserEntry,
    UsersFileError,
    hash_password,
    name_problem,
    parse_line,
    parse_password_field,
)

DEFAULT_FILE = "/etc/prefork-smtpd/users"
FILE_MODE = 0o640
PROG = "prefork-smtpd-users"


class Refused(Exception):
    """A command that cannot be carried out; the message says why."""


# ------------------------------------------------------------ the file
def read_lines(path: str, *, missing_ok: bool) -> list[str]:
    """The file's lines, ends kept, every entry checked (a broken file is
    refused before any edit, so an edit never hides an error)."""
    try:
        raw = read_regular_file(path)
    except FileNotFoundError:
        if missing_ok:
            return []
        raise Refused(f"{path}: no such users file") from None
    except OSError as exc:
        raise Refused(f"{path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        number = raw.count(b"\n", 0, exc.start) + 1
        raise Refused(f"{path}:{number}: not UTF-8 text") from None
    # Lines end at LF only, as for the loader (splitlines would also break
    # at form feeds); the last line may lack its LF.
    lines = [piece + "\n" for piece in text.split("\n")]
    lines[-1] = lines[-1][:-1]
    if not lines[-1]:
        lines.pop()
    for number, line in enumerate(lines, start=1):
        try:
            parse_line(line, f"{path}:{number}")
        except UsersFileError as exc:
            raise Refused(f"{exc} (fix it first)") from None
    return lines


def find(lines: list[str], name: str) -> int | None:
    """The index of ``name``'s line, compared in lowercase, or None."""
    for index, line in enumerate(lines):
        entry = parse_line(line, "")
        if entry is not None and entry.name.lower() == name.lower():
            return index
    return None


def write_atomically(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` so readers see the old or the new file,
    never a mix, and the new one survives a crash once this returns. A
    link is followed: the file it names is replaced, the link stays."""
    path = os.path.realpath(path)
    folder = os.path.dirname(path)
    try:
        old = os.stat(path)
    except FileNotFoundError:
        old = None
    fd, temp = tempfile.mkstemp(dir=folder, prefix=".users.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        if old is not None:
            # Keep the group (say, dovecot) that lets the readers read it.
            with contextlib.suppress(PermissionError):
                os.fchown(fd, old.st_uid, old.st_gid)
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def locked_folder(path: str) -> Iterator[None]:
    """Hold an exclusive lock on the file's folder for a read-modify-write.

    The folder, not the file: the file is replaced by a rename, and a lock
    on the old inode would not stop the next writer. A link's target's
    folder, as write_atomically writes there.
    """
    folder = os.path.dirname(os.path.realpath(path))
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise Refused(f"{folder}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ------------------------------------------------------------ commands
def add(path: str, name: str, password: str, scheme: str) -> str:
    with locked_folder(path):
        lines = read_lines(path, missing_ok=True)
        if find(lines, name) is not None:
            raise Refused(f"{name}: already in {path} (use passwd to change the password)")
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines.append(f"{name}:{hash_password(password, scheme)}\n")
        write_atomically(path, "".join(lines))
    return f"{name}: added ({scheme})"


def passwd(path: str, name: str, password: str, scheme: str) -> str:
    with locked_folder(path):
        lines = read_lines(path, missing_ok=False)
        index = find(lines, name)
        if index is None:
            raise Refused(f"{name}: no such user in {path}")
        line = lines[index]
        ending = line[len(line.rstrip("\r\n")) :]
        old = parse_line(line, "")
        assert old is not None  # find() gave a user's line
        scheme_name, hashed = parse_password_field(hash_password(password, scheme), "<new>")
        lines[index] = UserEntry(old.name, scheme_name, hashed, old.rest).line() + ending
        write_atomically(path, "".join(lines))
    return f"{name}: password changed ({scheme})"


def delete(path: str, name: str) -> str:
    with locked_folder(path):
        lines = read_lines(path, missing_ok=False)
        index = find(lines, name)
        if index is None:
            raise Refused(f"{name}: no such user in {path}")
        del lines[index]
        write_atomically(path, "".join(lines))
    return f"{name}: deleted"


def list_users(path: str) -> str:
    rows = []
    for line in read_lines(path, missing_ok=False):
        entry = parse_line(line, "")
        if entry is not None:
            rows.append(f"{entry.name}\t{entry.scheme}")
    return "\n".join(rows)


# ------------------------------------------------------------ front end
def users_file(args: argparse.Namespace) -> str:
    """--file, else the ``users`` key of --config, else the default.

    An empty --file or --config is a mistake (an unset shell variable),
    not a wish for the default: editing /etc's users file instead of the
    one meant would be the worst answer to it."""
    for flag in ("file", "config"):
        if getattr(args, flag, None) == "":
            raise Refused(f"--{flag} must name a file")
    if hasattr(args, "file"):
        return args.file
    config = getattr(args, "config", None)
    if config is None:
        return DEFAULT_FILE
    try:
        data, _ = read_toml(config)
    except ConfigFileError as exc:
        raise Refused(str(exc)) from None
    value = data.get("users", DEFAULT_FILE)
    if not isinstance(value, str) or not value:
        raise Refused(f"{config}: 'users' must be a file name")
    return value


def checked_name(name: str) -> str:
    problem = name_problem(name)
    if problem:
        raise Refused(problem)
    return name.lower()


def read_password(name: str, from_stdin: bool) -> str:
    """The new password: the first line of stdin, or typed twice at a prompt."""
    if from_stdin:
        raw = sys.stdin.buffer.readline()
        if raw.endswith(b"\n"):
            raw = raw[:-1]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            password = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Refused("the password on stdin is not UTF-8") from None
    else:
        try:
            password = getpass.getpass(f"New password for {name}: ")
            again = getpass.getpass("Retype the password: ")
        except EOFError:
            raise Refused("no password given (use --stdin to read it from a pipe)") from None
        if password != again:
            raise Refused("the passwords differ; nothing changed")
    if not password:
        raise Refused("empty password refused")
    if "\0" in password or "\n" in password:
        raise Refused("the password holds a NUL or a line break; SMTP AUTH cannot carry it")
    return password


def build_parser() -> argparse.ArgumentParser:
    # The shared options are accepted before or after the command; SUPPRESS
    # keeps a subcommand's absent option from hiding the global one.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--file", metavar="FILE", default=argparse.SUPPRESS, help=f"the users file (default {DEFAULT_FILE})"
    )
    common.add_argument(
        "--config", metavar="FILE", default=argparse.SUPPRESS, help="take the users file from this TOML's 'users' key"
    )
    common.add_argument(
        "--scheme",
        type=str.upper,
        choices=SCHEMES,
        default=argparse.SUPPRESS,
        help=f"hash scheme for add/passwd (default {DEFAULT_SCHEME})",
    )
    p = argparse.ArgumentParser(
        prog=PROG,
        parents=[common],
        description="Manage the users who may log in with SMTP AUTH (a Dovecot passwd-file).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb, text in (("add", "add a user"), ("passwd", "change a user's password")):
        sub = commands.add_parser(verb, parents=[common], help=text, description=text)
        sub.add_argument("name", help="local part or local@domain")
        sub.add_argument("--stdin", action="store_true", help="read the password from the first line of stdin")
    sub = commands.add_parser("delete", parents=[common], help="delete a user")
    sub.add_argument("name")
    commands.add_parser("list", parents=[common], help="list the users and their hash schemes")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    scheme = getattr(args, "scheme", DEFAULT_SCHEME)
    path = "?"
    try:
        path = users_file(args)
        if args.command == "list":
            text = list_users(path)
            if text:
                print(text)
            return 0
        name = checked_name(args.name)
        if args.command == "delete":
            message = delete(path, name)
        else:
            password = read_password(name, args.stdin)
            action = add if args.command == "add" else passwd
            try:
                message = action(path, name, password, scheme)
            except ValueError as exc:  # the scheme refused this password
                raise Refused(str(exc)) from None
    except Refused as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{PROG}: {exc.filename or path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
