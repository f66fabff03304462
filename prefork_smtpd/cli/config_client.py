"""``prefork-smtpd-config``: change a running server's settings.

Interactive (a prompt with line editing and history), or one-shot:
``prefork-smtpd-config logging=0 workers=8`` sends each message in order and
exits 1 if any was refused. ``--config FILE`` takes the address, port and
secret file from the server's own TOML file, so the two never disagree.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
import time

from prefork_smtpd import __version__
from prefork_smtpd.cli.lines import LineReader
from prefork_smtpd.config_file import ConfigFileError, read_toml
from prefork_smtpd.control import load_secret, parse_show_line
from prefork_smtpd.settings import PARAMETERS, PORT_ALIASES, PORT_HELP, RANGES, Settings, check_range


class Unreachable(Exception):
    pass


MAX_REPLY_LINE = 4096  # octets: the config port's lines are short


class ConfigConnection:
    """One connection to the config port; replies are read line by line.
    Each line is bounded and the whole reply must come within ``timeout``,
    however its bytes trickle in: a peer that is no config port gets a
    reason, not a wait without end."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise Unreachable(f"cannot reach {host}:{port}: {exc.strerror or exc}") from None
        self.lines = LineReader(self.sock, MAX_REPLY_LINE)
        self.reply_time = timeout

    def send(self, message: str) -> list[str]:
        """Send one message; return the reply lines up to and with OK/ERR."""
        self.sock.sendall(message.encode("ascii", "replace") + b"\r\n")
        deadline = time.monotonic() + self.reply_time
        lines = []
        while True:
            try:
                raw = self.lines.line(deadline)
            except ConnectionError:
                raise Unreachable("the server closed the connection") from None
            except TimeoutError:
                raise Unreachable(f"no complete reply within {self.reply_time:g} s: is this a config port?") from None
            except ValueError as exc:
                raise Unreachable(f"{exc}: is this a config port?") from None
            line = raw.decode("ascii", "replace").rstrip("\r")
            lines.append(line)
            if line == "OK" or line.startswith("ERR"):
                return lines

    def close(self) -> None:
        self.sock.close()


def help_text(values: dict[str, tuple[int, str]] | None) -> str:
    rows = ["Messages are <param>=<integer>. Parameters:"]
    for name in PARAMETERS:
        low, high = RANGES[name]
        now = f", now {values[name][0]} ({values[name][1]})" if values and name in values else ""
        rows.append(f"  {name:<24} {low}..{high}{now}: {PORT_HELP[name]}")
    rows += [f"  {alias:<24} the same as {name}" for alias, name in PORT_ALIASES.items()]
    rows += [
        "  show=1                   list the current values: param=value (default|file|flag|live),",
        "                           and the queue: queue_messages, queue_oldest_seconds (queue)",
        "  flush=1                  retry every queued mail now",
        "  reload=1                 re-read the config file, answered once the new workers accept;",
        "                           live changes stay unless the file changed the same key",
        "  token=N                  the secret, first, when the server has one",
        "Commands: help, quit.",
    ]
    return "\n".join(rows)


def current_values(conn: ConfigConnection) -> dict[str, tuple[int, str]] | None:
    lines = conn.send("show=1")
    if lines[-1] != "OK":
        return None
    values = {}
    for line in lines[:-1]:
        name, value, source = parse_show_line(line)
        values[name] = (value, source)
    return values


class BadConfigFile(Exception):
    pass


def endpoint_from_config(path: str) -> dict[str, object]:
    """config_address, config_port and config_secret_file from the server's TOML file.

    Only these keys are read and checked: the server checks the rest, so a
    reload with a mistake elsewhere in the file reaches the server, which
    refuses it with the line and logs it.
    """
    try:
        data, _ = read_toml(path)  # as the server reads it
    except ConfigFileError as exc:
        raise BadConfigFile(str(exc)) from None
    found: dict[str, object] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name in ("config_address", "config_secret_file"):
            if not isinstance(value, str):
                raise BadConfigFile(f"{path}: {name} must be a string")
            found[name] = value
        elif name == "config_port":
            if isinstance(value, bool) or not isinstance(value, int) or check_range(name, value):
                raise BadConfigFile(f"{path}: config_port must be an integer between 1 and 65535")
            found[name] = value
    return found


def reachable_address(address: str) -> str:
    """A server on every address (0.0.0.0, ::) is reached on loopback."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.is_unspecified:
        return "::1" if ip.version == 6 else "127.0.0.1"
    return address


def interactive(conn: ConfigConnection, host: str, port: int) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print(f"connected to {host}:{port}; type help for the parameters, quit to leave")
    while True:
        try:
            line = input("prefork-smtpd> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            line = "quit"
        if not line:
            continue
        if line.lower() == "help":
            print(help_text(current_values(conn)))
            continue
        if line.lower() == "quit":
            print(conn.send("QUIT")[-1])
            return 0
        for reply in conn.send(line):
            print(reply)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="prefork-smtpd-config",
        description="Change a running prefork-smtpd's settings through its config port.",
        epilog=help_text(None),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-v", "--version", action="version", version=f"prefork-smtpd-config {__version__}")
    d = Settings(workers=1, hostname="")
    p.add_argument(
        "--config", metavar="FILE",
        help="the server's TOML file: its config_address, config_port and config_secret_file; flags override them",
    )
    p.add_argument("-i", "--address", help=f"config port address (default {d.config_address})")
    p.add_argument("-P", "--port", type=int, help=f"config port (default {d.config_port})")
    p.add_argument("--secret-file", help="file with the server's config token")
    p.add_argument("messages", nargs="*", help="messages to send, e.g. logging=0 workers=8; none: interactive")
    args = p.parse_args(argv)
    if args.port is not None and not 1 <= args.port <= 65535:
        p.error(f"-P/--port: {args.port} is not a port (1..65535)")
    for message in args.messages:
        if any(c in message for c in "\r\n\0"):  # one message is one line: the replies would fall out of step
            p.error(f"a message holds a line break or a NUL: {message!r}")
    try:
        from_file = endpoint_from_config(args.config) if args.config is not None else {}
        args.address = reachable_address(
            args.address if args.address is not None else str(from_file.get("config_address", d.config_address))
        )
        if args.port is None:
            port = from_file.get("config_port", d.config_port)
            assert isinstance(port, int)  # endpoint_from_config checked it
            args.port = port
        if args.secret_file is None:
            args.secret_file = from_file.get("config_secret_file")
        # "is not None": a file named "0", or a secret of 0, is a secret all the same.
        secret = load_secret(args.secret_file) if args.secret_file is not None else None
    except (BadConfigFile, OSError, ValueError) as exc:
        print(f"prefork-smtpd-config: {exc}", file=sys.stderr)
        return 2
    try:
        conn = ConfigConnection(args.address, args.port)
        try:
            if secret is not None and conn.send(f"token={secret}")[-1] != "OK":
                print("prefork-smtpd-config: the server refused the token", file=sys.stderr)
                return 1
            if not args.messages:
                return interactive(conn, args.address, args.port)
            failed = False
            for message in args.messages:
                replies = conn.send(message)
                for reply in replies:
                    print(f"{message}: {reply}" if len(replies) == 1 else reply)
                failed |= replies[-1] != "OK"
            conn.send("QUIT")
            return 1 if failed else 0
        finally:
            conn.close()
    except (Unreachable, OSError) as exc:
        print(f"prefork-smtpd-config: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
