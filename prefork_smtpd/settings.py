"""Every setting of the server, in one table: ``REGISTRY``.

Each ``Setting`` says its name, type, default, valid range, when a change
takes effect, its command-line flags and help. Everything else is derived
from the table, so a setting means the same wherever it is set:

* the ``Settings`` dataclass: one field per setting, its default from the
  table (its type is declared there too, for type checkers, and checked
  against the table at import), plus a few bookkeeping fields;
* the command line (``cli/server.py``: flag, short alias, metavar, help,
  range check);
* the TOML keys and their type checks (``config_file.py``): the setting's
  name and each long flag's name, with ``_`` or ``-``;
* the config port (``control.py``, ``controlplane.py``): the ``LIVE``
  settings, in table order (the order of ``show=1``), their help and range;
* the shared-memory control block (``stats.CONTROL``): the ``shared``
  settings, which every worker reads at each use;
* what a reload may change: ``RESTART`` settings keep their old value;
* the README, which ``tests/test_settings.py`` checks names every setting.

How to add a setting
--------------------
1. Add one ``Setting(...)`` to ``REGISTRY`` below. Put a ``LIVE`` setting
   among the other live ones, where it should appear in ``show=1``; give it
   ``port_help``. A setting the workers must read live but the config port
   must not change gets ``shared=True``.
2. Declare its field in ``Settings``: ``max_widgets: int = REGISTERED``
   (the type ``annotation()`` gives: ``int``, ``str | None``, ...); the
   import says so if it is missing or its type disagrees.
3. Read it where it is used: ``settings.<name>`` (fixed for a worker's
   life), or ``worker.live.<name>`` for a shared or live one (each read
   looks at shared memory, so a change applies at once).
4. Mention its flag (and, if live, its config-port row) in README.md; the
   tests say what is missing.
Nothing else: flags, TOML key, config port, control block and their checks
follow from the table.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from .smtputf8 import ascii_domain

MiB = 1024 * 1024

# When a new value takes effect.
LIVE = "live"  # at once, on the config port too (implies shared)
RELOAD = "reload"  # on reload (SIGHUP, reload=1): the next generation of workers
RESTART = "restart"  # only on restart: the workers inherit its sockets

_MISSING: Any = object()


@dataclass(frozen=True)
class Setting:
    name: str  # the Settings field and the TOML key; the config port parameter if LIVE
    type: type  # int, str, bool (a switch: --x / --no-x) or list (a list of strings)
    default: Any = None  # None: unset (off, every address, ...)
    default_factory: Callable[[], Any] | None = None  # instead of default, computed at start
    help: str = ""  # the flag's help; "{default}" is replaced by the default
    flags: tuple[str, ...] = ()  # short aliases (-P), or long flags replacing --<name>
    metavar: str | None = None  # None: argparse's own (the name in capitals)
    range: tuple[int, int] | None = None  # (lowest, highest): every int setting has one
    change: str = RELOAD
    shared: bool = False  # in the shared control block (every LIVE setting is)
    port_help: str = ""  # the config port's help line (LIVE settings)
    port_aliases: tuple[str, ...] = ()  # other names the config port accepts
    default_doc: str | None = None  # the default in the docs, where the value itself would mislead

    def __post_init__(self) -> None:
        assert self.change in (LIVE, RELOAD, RESTART), self.name
        assert (self.range is not None) == (self.type is int), f"{self.name}: an int setting needs a range"
        assert self.change != LIVE or (self.shared and self.port_help), f"{self.name}: live means shared, with port_help"
        assert not self.shared or self.type is int, f"{self.name}: the control block holds integers"

    @property
    def long_flags(self) -> tuple[str, ...]:
        """``--max-recipients``, or the long flags given instead (``--domain``)."""
        given = tuple(f for f in self.flags if f.startswith("--"))
        return given or ("--" + self.name.replace("_", "-"),)

    @property
    def cli_flags(self) -> tuple[str, ...]:
        return tuple(f for f in self.flags if not f.startswith("--")) + self.long_flags

    @property
    def toml_keys(self) -> tuple[str, ...]:
        """The keys (``_`` form) a config file may give it by."""
        keys = [self.name] + [f[2:].replace("-", "_") for f in self.long_flags]
        return tuple(dict.fromkeys(keys))

    def default_value(self) -> Any:
        return self.default_factory() if self.default_factory is not None else self.default

    def check_range(self, value: int) -> str | None:
        """None if ``value`` is allowed, else the reason."""
        assert self.range is not None
        low, high = self.range
        if not low <= value <= high:
            return f"{self.name} must be between {low} and {high}"
        return None

    def check_file_value(self, value: object) -> tuple[object, str | None]:
        """A config file's value, checked: (the value to use, None) or (None, the reason)."""
        if self.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                return None, f"{self.name} must be an integer"
            return value, self.check_range(value)
        if self.type is bool:
            if not isinstance(value, bool):
                return None, f"{self.name} must be true or false"
            return value, None
        if self.type is list:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
                return None, f"{self.name} must be a list of domain names"
            return value, None
        if not isinstance(value, str):
            return None, f"{self.name} must be a string"
        return value, None


REGISTRY: tuple[Setting, ...] = (
    # -------------------------------------------- live: the config port changes them
    # (in this order in show=1; every worker reads them from shared memory)
    Setting(
        "logging", int, 1, help="0: logging off at start (default {default})", range=(-(2**63), 2**63 - 1),
        change=LIVE, shared=True, port_help="0 turns logging off, any other integer on", port_aliases=("logger",),
    ),
    Setting(
        "workers", int, default_factory=lambda: os.cpu_count() or 1, default_doc="CPU count",
        help="worker processes (default: CPU count, {default})", range=(1, 128),
        change=LIVE, shared=True, port_help="worker processes; leaving workers finish their sessions",
    ),
    Setting(
        "max_connections", int, 50_000, metavar="N", range=(1, 1_000_000),
        help="open SMTP connections, all workers together (default {default})",
        change=LIVE, shared=True, port_help="open SMTP connections; past it new clients get 421",
    ),
    Setting(
        "max_connections_per_ip", int, 0, metavar="N", range=(0, 1_000_000),  # 0: no per-address limit
        help="open connections from one address (IPv6: one /64), 0 for no limit (default {default})",
        change=LIVE, shared=True, port_help="open connections from one address (0: no limit)",
    ),
    # Bytes kept free on mail_dir's file system (0: no check): ten default-size
    # messages, room for the log and the system; Postfix needs 1.5 x the
    # message size limit, which this covers up to a 64 MiB limit.
    Setting(
        "min_free_space", int, 100 * MiB, metavar="BYTES", range=(0, 2**60),
        help="free space kept on mail_dir's file system, 0 for no check (default {default})",
        change=LIVE, shared=True, port_help="bytes kept free on the mail store; below it mail gets 452 (0: no check)",
    ),
    Setting(
        "max_message_size", int, 10 * MiB, metavar="BYTES", range=(1024, 2**40),
        help="message size (default {default})", change=LIVE, shared=True, port_help="bytes per message (SIZE)",
    ),
    Setting(
        "max_data_memory", int, 256 * MiB, metavar="BYTES", range=(1024, 2**40),  # at least one max-size message
        help="message data a worker holds in memory, at least one max-size message (default {default})",
        change=LIVE, shared=True, port_help="message bytes a worker holds in memory; past it mails get 452",
    ),
    Setting(
        "max_recipients", int, 100, metavar="N", range=(1, 100_000),
        help="recipients per message (default {default})", change=LIVE, shared=True,
        port_help="recipients per message",
    ),
    Setting(
        "timeout", int, 300, metavar="SECONDS", range=(1, 86_400),
        help="time to send one command (default {default})", change=LIVE, shared=True,
        port_help="seconds a client may take to send one command",
    ),
    Setting(
        "data_timeout", int, 600, metavar="SECONDS", range=(1, 86_400),
        help="time to send one message after 354, or one BDAT chunk (default {default})", change=LIVE, shared=True,
        port_help="seconds a client may take to send one message",
    ),
    Setting(
        "max_errors", int, 20, metavar="N", range=(1, 100_000),
        help="bad commands before the session is closed (default {default})", change=LIVE, shared=True,
        port_help="bad commands before a session is closed",
    ),
    # ------------------------------- shared, changed by reload: sessions read them live
    Setting(
        "max_command_line", int, 512, metavar="BYTES", range=(512, 65536),  # RFC 5321 forbids less than 512
        help="command line length, CRLF included (default {default})", shared=True,
    ),
    Setting(
        "max_text_line", int, 1000, metavar="BYTES", range=(1000, 1 << 20),  # RFC 5321 forbids less than 1000
        help="message line length, CRLF included (default {default})", shared=True,
    ),
    Setting(
        "max_hops", int, 100, metavar="N", range=(1, 10_000),  # RFC 5321 6.3: at least 100 by default
        help="Received header fields a message may carry; one more is a mail loop, refused with 554 (default {default})",
        shared=True,
    ),
    # ------------------------------------------ sockets: changed only by a restart
    Setting(
        "listen", str, None, flags=("-l",), metavar="ADDR", change=RESTART, default_doc="every address",  # None: every address, IPv6 and IPv4
        help="SMTP address (default: every IPv6 and IPv4 address)",
    ),
    Setting("port", int, 2525, flags=("-P",), range=(1, 65535), change=RESTART, help="SMTP port (default {default})"),
    Setting(
        "submission_port", int, None, metavar="PORT", range=(1, 65535), change=RESTART, default_doc="off",
        help="submission port (RFC 6409, usually 587), on -l's addresses: MAIL needs AUTH (--users),"
        " and STARTTLS first when --tls-cert is given (default: off)",
    ),
    Setting(
        "smtps_port", int, None, metavar="PORT", range=(1, 65535), change=RESTART, default_doc="off",
        help="implicit-TLS submission port (RFC 8314, usually 465), on -l's addresses: TLS from the first byte,"
        " MAIL needs AUTH; needs --tls-cert (default: off)",
    ),
    Setting(
        "proxy_protocol", str, None, metavar="LISTENERS", default_doc="none",
        help="listeners whose connections begin with a PROXY protocol header (v1 or v2, HAProxy's"
        " send-proxy/send-proxy-v2) from --trusted-proxies: a comma-separated list of smtp, submission,"
        " smtps (default: none)",
    ),
    Setting("backlog", int, 4096, metavar="N", range=(1, 65535), change=RESTART, help="listen backlog (default {default})"),
    Setting(
        "config_address", str, "127.0.0.1", flags=("-C",), metavar="ADDR", change=RESTART,
        help="config port address (default {default})",
    ),
    Setting(
        "config_port", int, 2526, flags=("-c",), range=(1, 65535), change=RESTART,
        help="config port (default {default})",
    ),
    Setting(
        "metrics_address", str, "127.0.0.1", metavar="ADDR", change=RESTART,
        help="Prometheus address (default {default})",
    ),
    Setting(
        "metrics_port", int, None, range=(1, 65535), change=RESTART, default_doc="off",  # the Prometheus endpoint; off unless set
        help="Prometheus port (default: off)",
    ),
    # -------------------------------------------- the rest: changed by a reload
    Setting(
        "config_secret_file", str, None, metavar="FILE", default_doc="none (loopback only)",
        help="file holding the config port's token",
    ),
    Setting(
        "config_max_clients", int, 64, metavar="N", range=(1, 4096),  # when full the least useful one goes
        help="config connections held; when full the one idle longest goes (default {default})",
    ),
    Setting(
        "config_login_timeout", int, 10, metavar="SECONDS", range=(1, 3600),
        help="time to send the config token (default {default})",
    ),
    Setting(
        "config_idle_timeout", int, 300, metavar="SECONDS", range=(1, 86_400),
        help="time a config connection may stay silent (default {default})",
    ),
    Setting(
        "config_max_login_failures", int, 3, metavar="N", range=(1, 1000),  # per connection, then it is closed
        help="failed logins per config connection before it closes (default {default})",
    ),
    Setting(
        "config_login_failures_per_minute", int, 10, metavar="N", range=(1, 1_000_000),  # IPv6: per /64
        help="failed config logins per client address and minute (default {default})",
    ),
    Setting(
        "metrics_max_clients", int, 64, metavar="N", range=(1, 4096),
        help="Prometheus connections held (default {default})",
    ),
    Setting(
        "metrics_timeout", int, 10, metavar="SECONDS", range=(1, 3600),
        help="time a scraper has to send its request (default {default})",
    ),
    Setting(
        "domains", list, default_factory=lambda: ["smtpd.com"], flags=("--domain",), metavar="D",
        help="a served domain; repeat for more; * serves every domain, a catch-all (nothing is ever relayed)"
        " (default smtpd.com)",
    ),
    Setting(
        "hostname", str, default_factory=socket.gethostname, default_doc="host name",
        help="name in the greeting and Received headers, a domain name or an address literal (default: host name)",
    ),
    Setting("mail_dir", str, "mail_dir", metavar="DIR", help="Maildir root (default {default})"),
    Setting(
        "mailboxes", str, "auto", metavar="auto|existing|FILE",  # see policy.py
        help="which recipients get a folder: any valid local part (auto, the default), only folders"
        " already in the mail dir (existing), or the mailboxes listed in FILE, one a line (read again on reload)",
    ),
    Setting(
        "folders", str, "local", metavar="local|address",  # see policy.py
        help="a recipient's folder: mail_dir/<local part> (local, the default) or mail_dir/<domain>/<local part>"
        " (address: a folder per domain, Dovecot's domain/user layout)",
    ),
    Setting(
        "recipient_delimiter", str, None, metavar="CHARS", default_doc="none",
        help="plus-addressing: with +, bob+invoices@ is delivered to bob (with several CHARS, the first of"
        " any of them splits the local part) (default: none)",
    ),
    Setting(
        "plus_folders", bool, False,
        help="with --recipient-delimiter: make the Maildir++ subfolder bob/.invoices for bob+invoices@"
        " (default: off, only a subfolder that exists is used)",
    ),
    Setting(
        # A user's folders by hand or by tag rarely pass a few dozen; a sender
        # making up tags gets 100 folders (500 inodes) per mailbox, no more.
        "max_plus_folders", int, 100, metavar="N", range=(0, 100_000),
        help="with --plus-folders: Maildir++ subfolders a mailbox may hold (its own count too) before the"
        " server makes no more; mail for a new tag then goes to the inbox (default {default})",
    ),
    Setting("log_file", str, "logs/log.txt", metavar="FILE", help="log file (default {default})"),
    Setting(
        # Clients make the lines: a log that cannot be written must not let
        # them grow a worker. 8 MiB is minutes of a busy worker's lines; the
        # least is two of the 32 KiB pieces a worker hands its log writer.
        "max_log_backlog", int, 8 * MiB, metavar="BYTES", range=(64 * 1024, 2**40),
        help="log lines a process (a worker, the queue runner, the master) holds while its log cannot be written;"
        " past it lines are dropped, counted and the count logged (default {default})",
    ),
    # -------------------------------------------------- TLS and AUTH (reload re-reads the files)
    Setting(
        "tls_cert", str, None, metavar="FILE", default_doc="none (no TLS)",
        help="TLS certificate chain, PEM (the server's certificate first): turns on STARTTLS;"
        " read again on reload, the old one kept if the new one is bad",
    ),
    Setting(
        "tls_key", str, None, metavar="FILE", default_doc="in --tls-cert",
        help="private key of --tls-cert, PEM, unencrypted (default: in the --tls-cert file)",
    ),
    Setting(
        "tls_handshake_timeout", int, 30, metavar="SECONDS", range=(1, 3600),
        help="time a client has to finish the TLS handshake (default {default})",
    ),
    Setting(
        "require_tls", bool, False,
        help="the SMTP port refuses MAIL before STARTTLS (530 5.7.0); needs --tls-cert (default: off;"
        " the submission port always requires it when TLS is configured)",
    ),
    Setting(
        "users", str, None, metavar="FILE", default_doc="none (no AUTH)",
        help="users who may log in (AUTH PLAIN/LOGIN), a Dovecot passwd-file (prefork-smtpd-users);"
        " read again on reload, the old one kept if the new one is bad",
    ),
    Setting(
        "loopback_auth_without_tls", bool, True,
        help="AUTH allowed without TLS from loopback clients (a webmail on this host); elsewhere it"
        " needs TLS (538 5.7.11) (default: on)",
    ),
    Setting(
        # Each argon2id check takes 64 MiB and ~0.1 s of one core: few at once.
        "auth_threads", int, 2, metavar="N", range=(1, 64),
        help="password-checking threads per worker (default {default})",
    ),
    Setting(
        "max_auth_checks", int, 8, metavar="N", range=(1, 10_000),
        help="password checks a worker runs or queues at once; more get 454 4.7.0 (default {default})",
    ),
    Setting(
        "auth_failure_delay", int, 1, metavar="SECONDS", range=(0, 60),
        help="wait before answering a wrong password with 535 (default {default})",
    ),
    Setting(
        "max_auth_failures", int, 3, metavar="N", range=(1, 1000), shared=True,
        help="failed logins per session before 421 and close (default {default})",
    ),
    # -------------------------------------------------- relay (reload; the queue runner reads them)
    Setting(
        "relay_networks", str, None, metavar="CIDR,...", default_doc="none",
        help="clients that may relay without AUTH, comma-separated networks (10.0.0.0/8,2001:db8::/32);"
        " authenticated users may always relay (default: none)",
    ),
    Setting(
        "queue_dir", str, None, metavar="DIR", default_doc="`queue` beside mail_dir",
        help="the outbound queue, on mail_dir's file system (default: a folder named queue beside mail_dir)",
    ),
    Setting(
        "relay_host", str, None, metavar="HOST:PORT", default_doc="none (MX lookup)",
        help="smarthost for all outbound mail; without it, each recipient domain's MX (default: none)",
    ),
    Setting(
        "relay_starttls", bool, False,
        help="require STARTTLS to the relay host, its certificate checked (default: off)",
    ),
    Setting(
        "relay_ca_file", str, None, metavar="FILE", default_doc="the system's CAs",
        help="CA certificates (PEM) the relay host's certificate is checked against",
    ),
    Setting(
        "relay_auth_file", str, None, metavar="FILE", default_doc="none (no AUTH)",
        help="file holding user:password for AUTH at the relay host (default: none)",
    ),
    Setting(
        "relay_port", int, 25, metavar="PORT", range=(1, 65535),
        help="port of the MX hosts found by DNS (default {default})",
    ),
    Setting(
        "relay_nameserver", str, None, metavar="HOST:PORT", default_doc="the system's resolver",
        help="DNS server for MX lookups (default: /etc/resolv.conf's)",
    ),
    Setting(
        "relay_timeout", int, 300, metavar="SECONDS", range=(1, 3600),  # RFC 5321 4.5.3.2: 5 minutes
        help="time the next hop gets for each step of a delivery (default {default})",
    ),
    Setting(
        "relay_max_addresses", int, 5, metavar="N", range=(1, 100),  # Postfix's smtp_mx_address_limit
        help="MX hosts looked up, and as many next-hop addresses tried, for one domain per delivery attempt,"
        " in preference order; an address seen already is not tried again (default {default})",
    ),
    Setting(
        "relay_max_connections", int, 20, metavar="N", range=(1, 10_000),
        help="outbound deliveries and connections at once, all next hops together (default {default})",
    ),
    Setting(
        "relay_connections", int, 4, metavar="N", range=(1, 1000),
        help="connections kept open in parallel to one next hop (default {default})",
    ),
    Setting(
        "relay_mails_per_connection", int, 100, metavar="N", range=(1, 100_000),
        help="mails sent over one connection before it is closed (default {default})",
    ),
    Setting(
        "relay_idle_time", int, 2, metavar="SECONDS", range=(1, 300),  # Postfix's smtp_connection_cache_time_limit
        help="how long an unused connection to a next hop stays open (default {default})",
    ),
    Setting(
        "queue_scan_interval", int, 60, metavar="SECONDS", range=(1, 3600),
        help="seconds between full looks at the queue; new mail wakes the runner at once (default {default})",
    ),
    Setting(
        "queue_lifetime", int, 5 * 86_400, metavar="SECONDS", range=(1, 365 * 86_400),  # Postfix's maximal_queue_lifetime
        help="how long a mail is retried before it bounces (default {default}, 5 days)",
    ),
    Setting(
        "queue_retry_min", int, 300, metavar="SECONDS", range=(1, 86_400),  # Postfix's minimal_backoff_time
        help="wait before the first retry; it doubles at each failure (default {default})",
    ),
    Setting(
        "queue_retry_max", int, 4000, metavar="SECONDS", range=(1, 7 * 86_400),  # Postfix's maximal_backoff_time
        help="longest wait between retries (default {default})",
    ),
    Setting(
        # Sendmail's Timeout.queuewarn: a sender hears within half a working
        # day that a mail is stuck, long before the 5-day bounce.
        "delay_warning_time", int, 4 * 3600, metavar="SECONDS", range=(0, 365 * 86_400),
        help="after this long in the queue a recipient still deferred gets its sender one \"delayed\" notice"
        " (NOTIFY=DELAY, or no NOTIFY); 0: never (default {default}, 4 hours)",
    ),
    Setting(
        "trusted_proxies", str, None, metavar="CIDR,...", default_doc="none",
        help="addresses allowed to send a PROXY header on --proxy-protocol listeners, comma-separated"
        " networks (10.0.0.0/24,2001:db8::/64; a bare address is one host); others get 421 (default: none)",
    ),
    Setting(
        "proxy_timeout", int, 5, metavar="SECONDS", range=(1, 3600),
        help="time a trusted proxy has to send the PROXY header; then the connection is closed (default {default})",
    ),
    Setting(
        "graceful_timeout", int, 30, metavar="SECONDS", range=(0, 86_400),
        help="time sessions get to finish on stop (default {default})",
    ),
    Setting(
        "max_requests", int, 0, metavar="N", range=(0, 2**31),  # recycle a worker after this many sessions
        help="sessions before a worker is recycled, 0 for never (default {default})",
    ),
    Setting(
        # A journal replaces one of the two flushes a batch waits for (see
        # journal.py). Off by default: with it, the 250 comes before the
        # Maildir copy itself is durable (the journal holds the mail). 16 MiB
        # is about 12,000 small mails, put back in seconds after a crash;
        # the replay runs in the master, hence the 1 GiB bound.
        "journal_size", int, 0, metavar="BYTES", range=(0, 1 << 30),
        help="turns on the journal: a delivery thread appends batches of small mails to it, one flush each,"
        " and makes their Maildir copies durable once it holds this many octets; 0: no journal, every"
        " copy and its name durable before the 250 (default {default}; 16777216 is a good size)",
    ),
    Setting(
        # One: while it flushes, the next batch fills (measured ~10% faster than 2).
        "delivery_threads", int, 1, metavar="N", range=(1, 256),
        help="disk-writing threads per worker (default {default})",
    ),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in REGISTRY}
assert len(BY_NAME) == len(REGISTRY), "two settings share a name"

# name -> (lowest, highest) for every integer setting.
RANGES: dict[str, tuple[int, int]] = {s.name: s.range for s in REGISTRY if s.range is not None}
# The config port's parameters, in show=1 order, their help, and other names.
PARAMETERS: tuple[str, ...] = tuple(s.name for s in REGISTRY if s.change == LIVE)
PORT_HELP: dict[str, str] = {s.name: s.port_help for s in REGISTRY if s.change == LIVE}
PORT_ALIASES: dict[str, str] = {alias: s.name for s in REGISTRY for alias in s.port_aliases}
# The shared control block's settings, in layout order.
SHARED: tuple[str, ...] = tuple(s.name for s in REGISTRY if s.shared)
NEEDS_RESTART: tuple[str, ...] = tuple(s.name for s in REGISTRY if s.change == RESTART)
# A config file's key (``_`` form) -> the setting it gives.
TOML_KEYS: dict[str, str] = {key: s.name for s in REGISTRY for key in s.toml_keys}


def check_range(name: str, value: int) -> str | None:
    """None if ``value`` is allowed for ``name``, else the reason."""
    return BY_NAME[name].check_range(value)


def annotation(setting: Setting) -> str:
    """The type a ``Settings`` field must declare for ``setting``: ``int``, ``str | None``, ``list[str]``..."""
    kind = setting.type.__name__ + ("[str]" if setting.type is list else "")
    if setting.default is None and setting.default_factory is None:
        kind += " | None"
    return kind


# The default of every Settings field that is a setting: filled in from its
# REGISTRY entry (default or default_factory) before @dataclass reads the class.
REGISTERED: Any = object()


def registry_mismatches(cls: type, registry: tuple[Setting, ...]) -> list[str]:
    """How ``cls``'s fields and ``registry`` disagree (empty when they agree).

    Every setting needs a field declared ``= REGISTERED`` with ``annotation(setting)``
    as its type, and every such field a setting.
    """
    declared = cls.__dict__.get("__annotations__", {})
    from_registry = {name for name in declared if cls.__dict__.get(name) is REGISTERED}
    problems = []
    for setting in registry:
        want = annotation(setting)
        if setting.name not in from_registry:
            problems.append(f"{setting.name} has no field in {cls.__name__}: add `{setting.name}: {want} = REGISTERED`")
        elif declared[setting.name] != want:
            problems.append(
                f"{cls.__name__}.{setting.name} is declared {declared[setting.name]!r}, its setting makes it {want!r}"
            )
    names = {s.name for s in registry}
    problems += [f"{cls.__name__}.{name} has no entry in REGISTRY" for name in sorted(from_registry - names)]
    return problems


_Class = TypeVar("_Class")


def _defaults_from_registry(cls: type[_Class]) -> type[_Class]:
    """Check ``cls`` against REGISTRY and give each ``REGISTERED`` field its setting's default."""
    if problems := registry_mismatches(cls, REGISTRY):
        raise TypeError("Settings and REGISTRY disagree: " + "; ".join(problems))
    for setting in REGISTRY:
        if setting.default_factory is not None:
            setattr(cls, setting.name, field(default_factory=setting.default_factory))
        else:
            setattr(cls, setting.name, field(default=setting.default))
    return cls


@dataclass
@_defaults_from_registry
class Settings:
    """The server's settings: one field per REGISTRY entry (its type declared
    here, for type checkers; its default in the entry), plus bookkeeping."""

    logging: int = REGISTERED
    workers: int = REGISTERED
    max_connections: int = REGISTERED
    max_connections_per_ip: int = REGISTERED
    min_free_space: int = REGISTERED
    max_message_size: int = REGISTERED
    max_data_memory: int = REGISTERED
    max_recipients: int = REGISTERED
    timeout: int = REGISTERED
    data_timeout: int = REGISTERED
    max_errors: int = REGISTERED
    max_command_line: int = REGISTERED
    max_text_line: int = REGISTERED
    max_hops: int = REGISTERED
    listen: str | None = REGISTERED
    port: int = REGISTERED
    submission_port: int | None = REGISTERED
    smtps_port: int | None = REGISTERED
    proxy_protocol: str | None = REGISTERED
    backlog: int = REGISTERED
    config_address: str = REGISTERED
    config_port: int = REGISTERED
    metrics_address: str = REGISTERED
    metrics_port: int | None = REGISTERED
    config_secret_file: str | None = REGISTERED
    config_max_clients: int = REGISTERED
    config_login_timeout: int = REGISTERED
    config_idle_timeout: int = REGISTERED
    config_max_login_failures: int = REGISTERED
    config_login_failures_per_minute: int = REGISTERED
    metrics_max_clients: int = REGISTERED
    metrics_timeout: int = REGISTERED
    domains: list[str] = REGISTERED
    hostname: str = REGISTERED
    mail_dir: str = REGISTERED
    mailboxes: str = REGISTERED
    folders: str = REGISTERED
    recipient_delimiter: str | None = REGISTERED
    plus_folders: bool = REGISTERED
    max_plus_folders: int = REGISTERED
    log_file: str = REGISTERED
    max_log_backlog: int = REGISTERED
    tls_cert: str | None = REGISTERED
    tls_key: str | None = REGISTERED
    tls_handshake_timeout: int = REGISTERED
    require_tls: bool = REGISTERED
    users: str | None = REGISTERED
    loopback_auth_without_tls: bool = REGISTERED
    auth_threads: int = REGISTERED
    max_auth_checks: int = REGISTERED
    auth_failure_delay: int = REGISTERED
    max_auth_failures: int = REGISTERED
    relay_networks: str | None = REGISTERED
    queue_dir: str | None = REGISTERED
    relay_host: str | None = REGISTERED
    relay_starttls: bool = REGISTERED
    relay_ca_file: str | None = REGISTERED
    relay_auth_file: str | None = REGISTERED
    relay_port: int = REGISTERED
    relay_nameserver: str | None = REGISTERED
    relay_timeout: int = REGISTERED
    relay_max_addresses: int = REGISTERED
    relay_max_connections: int = REGISTERED
    relay_connections: int = REGISTERED
    relay_mails_per_connection: int = REGISTERED
    relay_idle_time: int = REGISTERED
    queue_scan_interval: int = REGISTERED
    queue_lifetime: int = REGISTERED
    queue_retry_min: int = REGISTERED
    queue_retry_max: int = REGISTERED
    delay_warning_time: int = REGISTERED
    trusted_proxies: str | None = REGISTERED
    proxy_timeout: int = REGISTERED
    graceful_timeout: int = REGISTERED
    max_requests: int = REGISTERED
    journal_size: int = REGISTERED
    delivery_threads: int = REGISTERED

    # Bookkeeping, no setting: not flags, keys or parameters.
    config_file: str | None = None  # where these settings came from, for reload
    mailbox_list: frozenset[str] | None = None  # local parts a mailboxes FILE names, once read
    # name -> "file" or "flag" for each value not left at its default
    sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        # A domain in U-labels is served as its A-labels, the form the
        # session compares (straße.de: xn--strae-oqa.de); one IDNA 2008
        # refuses stays as written, for policy.settings_problem to refuse.
        # A fully qualified name's final dot names the same domain.
        domains = [d[:-1] if d.endswith(".") and d != "." else d for d in self.domains]
        self.domains = [d.lower() if d.isascii() else ascii_domain(d) or d for d in domains]


# ------------------------------------------------------------------ docs
_WHEN = {LIVE: "live (config port)", RELOAD: "reload", RESTART: "restart"}


def _number(n: int) -> str:
    if n >= 2**20 and n & (n - 1) == 0:
        return f"2^{n.bit_length() - 1}"
    return f"{n:,}" if abs(n) >= 10_000 else str(n)


def _doc_default(setting: Setting) -> str:
    if setting.default_doc is not None:
        return setting.default_doc
    value = setting.default_value()
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ", ".join(value)
    if isinstance(value, int) and value >= MiB and value % MiB == 0:
        return f"{value // MiB} MiB"
    if isinstance(value, int):
        return _number(value)
    return f"`{value}`"


def _doc_range(setting: Setting) -> str:
    if setting.range is None:
        return ""
    low, high = setting.range
    if (low, high) == (-(2**63), 2**63 - 1):
        return "any integer"
    return f"{_number(low)}..{_number(high)}"


def markdown_table() -> str:
    """README.md's table of every setting (``python -m prefork_smtpd.settings`` prints it)."""
    rows = [
        "| flag | TOML key | default | range | changes on | what |",
        "|---|---|---|---|---|---|",
    ]
    for s in REGISTRY:
        flags = "/".join(f"`{f}`" for f in s.cli_flags)
        what = re.sub(r"\s*\(default[^)]*\)$", "", s.help).replace("|", "\\|")
        keys = ", ".join(f"`{k}`" for k in s.toml_keys)
        rows.append(f"| {flags} | {keys} | {_doc_default(s)} | {_doc_range(s)} | {_WHEN[s.change]} | {what} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
