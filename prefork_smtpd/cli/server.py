"""``prefork-smtpd``: the server's command line."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

from prefork_smtpd import __version__
from prefork_smtpd.config_file import ConfigFileError, load_config_file
from prefork_smtpd.listeners import proxy_problem
from prefork_smtpd.policy import MODES, MailboxListError, load_mailbox_list, names_from
from prefork_smtpd.policy import settings_problem as address_problem
from prefork_smtpd.session import valid_helo_name
from prefork_smtpd.settings import LIVE, REGISTRY, RELOAD, RESTART, Settings, check_range


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
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


# The --help sections, by when a change takes effect.
_GROUPS = (
    (LIVE, "live settings (the config port changes them too)"),
    (RELOAD, "settings a reload changes"),
    (RESTART, "settings that change only on restart"),
)


def build_parser() -> argparse.ArgumentParser:
    """Every flag of settings.REGISTRY, with --config and --version."""
    d = Settings()
    p = _Parser(
        prog="prefork-smtpd",
        description="A prefork SMTP server that stores mail in Maildir folders.",
        argument_default=argparse.SUPPRESS,  # only what was given overrides the file
    )
    p.add_argument("-v", "--version", action="version", version=f"prefork-smtpd {__version__}")
    p.add_argument("--config", metavar="FILE", help="TOML file with settings; flags override it")
    groups = {change: p.add_argument_group(title) for change, title in _GROUPS}
    for setting in REGISTRY:
        options: dict = {"dest": setting.name, "help": setting.help.format(default=getattr(d, setting.name))}
        if setting.metavar is not None:
            options["metavar"] = setting.metavar
        if setting.type is int:
            options["type"] = _int_setting(setting.name)
        elif setting.type is list:
            options["action"] = "append"
        elif setting.type is bool:
            options["action"] = argparse.BooleanOptionalAction
        groups[setting.change].add_argument(*setting.cli_flags, **options)
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
                settings.mailbox_list = load_mailbox_list(settings.mailboxes, names_from(settings))
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
    for setting in REGISTRY:  # no file name, address or name the system could take holds a NUL
        value = getattr(settings, setting.name)
        if any("\0" in item for item in (value if isinstance(value, list) else [value]) if isinstance(item, str)):
            return f"{setting.long_flags[0]}: a NUL byte in {value!r}"
    if settings.submission_port is not None and settings.submission_port == settings.port:
        return "--submission-port must differ from --port"
    if settings.sources.get("hostname") and not valid_helo_name(settings.hostname):
        # It goes into every greeting, EHLO reply and Received header as it is.
        return f"--hostname must be a domain name or an address literal, not {settings.hostname!r}"
    tls_problem = _tls_problem(settings) or proxy_problem(settings) or address_problem(settings)
    if tls_problem:
        return tls_problem
    if settings.config_secret_file is None and not _is_loopback(settings.config_address):
        return "--config-secret-file is required when the config port is not on loopback"
    if settings.config_secret_file is not None:
        from prefork_smtpd.control import load_secret

        try:
            load_secret(settings.config_secret_file)
        except (OSError, ValueError) as exc:
            return f"config secret: {exc}"
    relay_problem = _relay_problem(settings)
    if relay_problem:
        return relay_problem
    from prefork_smtpd.delivery import check_mail_dir
    from prefork_smtpd.queue import check_queue_dir, queue_dir_of

    # Here rather than at the first mail: a server that cannot store answers
    # 451 to everyone, so it must not start (or reload into that state).
    from prefork_smtpd.relayrights import relay_possible

    problem = check_mail_dir(settings.mail_dir)
    if problem is None and relay_possible(settings):  # no relay, no queue: nothing to check
        problem = check_queue_dir(queue_dir_of(settings), settings.mail_dir)
    return problem


def _relay_problem(settings: Settings) -> str | None:
    """What is wrong with the relay settings: networks, host:port pairs, the AUTH file."""
    from prefork_smtpd.relayrights import relay_networks
    from prefork_smtpd.runner import _read_auth, parse_host_port

    try:
        relay_networks(settings.relay_networks)
        if settings.relay_host is not None:
            parse_host_port(settings.relay_host)
        if settings.relay_nameserver is not None:
            parse_host_port(settings.relay_nameserver, 53)
    except ValueError as exc:
        return str(exc)
    if settings.relay_auth_file is not None:
        try:
            _read_auth(settings.relay_auth_file)
        except (OSError, ValueError) as exc:
            return f"--relay-auth-file: {exc}"
    if settings.queue_retry_min > settings.queue_retry_max:
        return "--queue-retry-min must not exceed --queue-retry-max"
    return None


def _tls_problem(settings: Settings) -> str | None:
    """What the TLS and AUTH settings lack or clash on (the files are read by the master)."""
    ports = [p for p in (settings.port, settings.submission_port, settings.smtps_port) if p is not None]
    if len(set(ports)) != len(ports):
        return "--port, --submission-port and --smtps-port must differ"
    if settings.tls_cert is None:
        if settings.smtps_port is not None:
            return "--smtps-port needs --tls-cert (and --tls-key)"
        if settings.require_tls:
            return "--require-tls needs --tls-cert (and --tls-key)"
        if settings.tls_key is not None:
            return "--tls-key needs --tls-cert"
    return None


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

