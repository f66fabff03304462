"""``prefork-smtpd``: the server's command line."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from prefork_smtpd import __version__
from prefork_smtpd.config_file import ConfigFileError, load_config_file
from prefork_smtpd.policy import MODES, MailboxListError, load_mailbox_list
from prefork_smtpd.settings import Settings, check_range


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, exit 2: easy to read in a terminal and in journald.
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_setting(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        reason = check_range(name, value)
        if reason:
            raise argparse.ArgumentTypeError(reason)
        return value

    parse.__name__ = name  # argparse names the type in its messages
    return parse


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = _Parser(
        prog="prefork-smtpd",
        description="A prefork SMTP server that stores mail in Maildir folders.",
        argument_default=argparse.SUPPRESS,  # only what was given overrides the file
    )
    p.add_argument("-v", "--version", action="version", version=f"prefork-smtpd {__version__}")
    p.add_argument("--config", metavar="FILE", help="TOML file with settings; flags override it")
    p.add_argument("--workers", type=_int_setting("workers"), help=f"worker processes (default: CPU count, {d.workers})")
    p.add_argument("-l", "--listen", metavar="ADDR", help="SMTP address (default: every IPv6 and IPv4 address)")
    p.add_argument("-P", "--port", type=_int_setting("port"), help=f"SMTP port (default {d.port})")
    p.add_argument(
        "--submission-port", type=_int_setting("submission_port"), metavar="PORT",
        help="submission port (RFC 6409), on -l's addresses: MAIL needs AUTH, which is not available yet,"
        " so MAIL gets 530 there (default: off)",
    )
    p.add_argument("-C", "--config-address", metavar="ADDR", help=f"config port address (default {d.config_address})")
    p.add_argument("-c", "--config-port", type=_int_setting("config_port"), help=f"config port (default {d.config_port})")
    p.add_argument("--config-secret-file", metavar="FILE", help="file holding the config port's token")
    for name, unit, what in (
        ("config_max_clients", "N", "config connections held; when full the one idle longest goes"),
        ("config_login_timeout", "SECONDS", "time to send the config token"),
        ("config_idle_timeout", "SECONDS", "time a config connection may stay silent"),
        ("config_max_login_failures", "N", "failed logins per config connection before it closes"),
        ("config_login_failures_per_minute", "N", "failed config logins per client address and minute"),
        ("metrics_max_clients", "N", "Prometheus connections held"),
        ("metrics_timeout", "SECONDS", "time a scraper has to send its request"),
    ):
        p.add_argument(
            "--" + name.replace("_", "-"), type=_int_setting(name), metavar=unit,
            help=f"{what} (default {getattr(d, name)})",
        )
    p.add_argument("--metrics-address", metavar="ADDR", help=f"Prometheus address (default {d.metrics_address})")
    p.add_argument("--metrics-port", type=_int_setting("metrics_port"), help="Prometheus port (default: off)")
    p.add_argument(
        "--domain", dest="domains", action="append", metavar="D",
        help=f"a served domain; repeat for more (default {d.domains[0]})",
    )
    p.add_argument("--hostname", help="name in the greeting and Received headers (default: host name)")
    p.add_argument("--mail-dir", metavar="DIR", help=f"Maildir root (default {d.mail_dir})")
    p.add_argument(
        "--mailboxes", metavar="auto|existing|FILE",
        help="which recipients get a folder: any valid local part (auto, the default), only folders"
        " already in the mail dir (existing), or the local parts listed in FILE, one a line (read again on reload)",
    )
    p.add_argument("--log-file", metavar="FILE", help=f"log file (default {d.log_file})")
    p.add_argument("--logging", type=_int_setting("logging"), help="0: logging off at start (default 1)")
    for name, unit, what in (
        ("max_message_size", "BYTES", "message size"),
        ("max_data_memory", "BYTES", "message data a worker holds in memory, at least one max-size message"),
        ("max_recipients", "N", "recipients per message"),
        ("max_command_line", "BYTES", "command line length, CRLF included"),
        ("max_text_line", "BYTES", "message line length, CRLF included"),
        ("max_errors", "N", "bad commands before the session is closed"),
        ("timeout", "SECONDS", "time to send one command"),
        ("data_timeout", "SECONDS", "time to send one message after 354"),
        ("max_connections", "N", "open SMTP connections, all workers together"),
        ("max_connections_per_ip", "N", "open connections from one address (IPv6: one /64), 0 for no limit"),
        ("min_free_space", "BYTES", "free space kept on mail_dir's file system, 0 for no check"),
        ("graceful_timeout", "SECONDS", "time sessions get to finish on stop"),
        ("max_requests", "N", "sessions before a worker is recycled, 0 for never"),
        ("backlog", "N", "listen backlog"),
        ("delivery_threads", "N", "disk-writing threads per worker"),
    ):
        p.add_argument(
            "--" + name.replace("_", "-"), type=_int_setting(name), metavar=unit,
            help=f"{what} (default {getattr(d, name)})",
        )
    return p


def settings_from_args(argv: list[str] | None = None) -> tuple[Settings, Callable[[], Settings]]:
    """The settings to start with, and how to build them again on reload."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    config_file = args.pop("config", None)

    def build() -> Settings:
        values: dict = load_config_file(config_file) if config_file is not None else {}
        sources = {name: "file" for name in values}
        values.update(args)  # flags override the file
        sources.update({name: "flag" for name in args})
        settings = Settings(config_file=config_file, sources=sources, **values)
        problem = settings_problem(settings)
        if problem:
            raise ConfigFileError(problem)
        if settings.mailboxes not in MODES:  # a file: read it now, at start and on each reload
            try:
                settings.mailbox_list = load_mailbox_list(settings.mailboxes)
            except MailboxListError as exc:
                raise ConfigFileError(str(exc)) from None
        return settings

    try:
        return build(), build
    except ConfigFileError as exc:
        parser.error(str(exc))
        raise  # not reached: error() exits


def settings_problem(settings: Settings) -> str | None:
    """What makes these settings unusable together, or None."""
    if settings.submission_port is not None and settings.submission_port == settings.port:
        return "--submission-port must differ from --port"
    if settings.config_secret_file is None and not _is_loopback(settings.config_address):
        return "--config-secret-file is required when the config port is not on loopback"
    if settings.config_secret_file is not None:
        from prefork_smtpd.control import load_secret

        try:
            load_secret(settings.config_secret_file)
        except (OSError, ValueError) as exc:
            return f"config secret: {exc}"
    from prefork_smtpd.delivery import check_mail_dir

    # Here rather than at the first mail: a server that cannot store answers
    # 451 to everyone, so it must not start (or reload into that state).
    return check_mail_dir(settings.mail_dir)


def _is_loopback(address: str) -> bool:
    import ipaddress

    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    settings, reread = settings_from_args(argv)
    from prefork_smtpd.master import Master, StartupError

    try:
        return Master(settings, reread).run()
    except StartupError as exc:  # a usage problem: which socket or file, and why
        print(f"prefork-smtpd: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"prefork-smtpd: error: {exc}", file=sys.stderr)
        return 1

