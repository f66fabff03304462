"""``prefork-smtpd-config``: change a running server's settings.

Interactive (a prompt with line editing and history), or one-shot:
``prefork-smtpd-config logging=0 workers=8`` sends each message in order and
exits 1 if any was refused.
"""

from __future__ import annotations

import argparse
import socket
import sys

from prefork_smtpd import __version__
from prefork_smtpd.control import HELP, PARAMETERS, load_secret
from prefork_smtpd.settings import RANGES


class Unreachable(Exception):
    pass


class ConfigConnection:
    """One connection to the config port; replies are read line by line."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise Unreachable(f"cannot reach {host}:{port}: {exc.strerror or exc}") from None
        self.file = self.sock.makefile("rb")

    def send(self, message: str) -> list[str]:
        """Send one message; return the reply lines up to and with OK/ERR."""
        self.sock.sendall(message.encode("ascii", "replace") + b"\r\n")
        lines = []
        while True:
            raw = self.file.readline()
            if not raw:
                raise Unreachable("the server closed the connection")
            line = raw.decode("ascii", "replace").rstrip("\r\n")
            lines.append(line)
            if line == "OK" or line.startswith("ERR"):
                return lines

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def help_text(values: dict[str, int] | None) -> str:
    rows = ["Messages are <param>=<integer>. Parameters:"]
    for name in PARAMETERS:
        low, high = RANGES[name]
        now = f", now {values[name]}" if values and name in values else ""
        rows.append(f"  {name:<24} {low}..{high}{now}: {HELP[name]}")
    rows += [
        "  logger                   the same as logging",
        "  show=1                   list the current values",
        "Commands: help, quit.",
    ]
    return "\n".join(rows)


def current_values(conn: ConfigConnection) -> dict[str, int] | None:
    lines = conn.send("show=1")
    if lines[-1] != "OK":
        return None
    return {k: int(v) for k, v in (line.split("=", 1) for line in lines[:-1])}


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
    p.add_argument("-i", "--address", default="127.0.0.1", help="config port address (default 127.0.0.1)")
    p.add_argument("-P", "--port", type=int, default=2526, help="config port (default 2526)")
    p.add_argument("--secret-file", help="file with the server's config token")
    p.add_argument("messages", nargs="*", help="messages to send, e.g. logging=0 workers=8; none: interactive")
    args = p.parse_args(argv)
    try:
        secret = load_secret(args.secret_file) if args.secret_file else None
    except (OSError, ValueError) as exc:
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
