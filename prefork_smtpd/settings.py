"""Every setting of the server, its default and its valid range, in one place.

The command line (``cli/server.py``), the TOML config file and the config
port all check values against ``RANGES``, so a limit means the same
wherever it is set.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

MiB = 1024 * 1024


@dataclass
class Settings:
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    listen: str | None = None  # None: every address, IPv6 and IPv4
    port: int = 2525
    submission_port: int | None = None  # RFC 6409 submission (MAIL needs AUTH); off unless set
    config_address: str = "127.0.0.1"
    config_port: int = 2526
    config_secret_file: str | None = None
    config_max_clients: int = 64  # held connections; when full the least useful one goes
    config_login_timeout: int = 10  # seconds to send the token
    config_idle_timeout: int = 300  # seconds a config connection may stay silent
    config_max_login_failures: int = 3  # per connection, then it is closed
    config_login_failures_per_minute: int = 10  # per client address (IPv6: per /64)
    metrics_address: str = "127.0.0.1"
    metrics_port: int | None = None  # Prometheus endpoint; off unless set
    metrics_max_clients: int = 64
    metrics_timeout: int = 10  # seconds a scraper has to send its request
    domains: list[str] = field(default_factory=lambda: ["smtpd.com"])
    hostname: str = field(default_factory=socket.gethostname)
    mail_dir: str = "mail_dir"
    log_file: str = "logs/log.txt"
    logging: int = 1
    max_message_size: int = 10 * MiB
    max_data_memory: int = 256 * MiB  # message bytes a worker holds in memory (at least one max-size message)
    max_recipients: int = 100
    max_command_line: int = 512
    max_text_line: int = 1000
    max_errors: int = 20
    timeout: int = 300  # seconds a client may take to send one command
    data_timeout: int = 600  # seconds a client may take to send one message
    max_connections: int = 50_000
    max_connections_per_ip: int = 0  # 0: no per-address limit
    # Bytes kept free on mail_dir's file system (0: no check): ten default-size
    # messages, room for the log and the system; Postfix needs 1.5 x the
    # message size limit, which this covers up to a 64 MiB limit.
    min_free_space: int = 100 * MiB
    mailboxes: str = "auto"  # auto | existing | FILE (see policy.py)
    mailbox_list: frozenset[str] | None = None  # the local parts a mailboxes FILE names, once read
    graceful_timeout: int = 30
    max_requests: int = 0  # recycle a worker after this many sessions; 0: never
    backlog: int = 4096
    delivery_threads: int = 1  # one: while it flushes, the next batch fills (measured ~10% faster than 2)
    config_file: str | None = None  # where these settings came from, for reload
    # name -> "file" or "flag" for each value not left at its default
    sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.domains = [d.lower() for d in self.domains]


# name -> (lowest, highest) for every integer setting.
RANGES: dict[str, tuple[int, int]] = {
    "workers": (1, 128),
    "port": (1, 65535),
    "submission_port": (1, 65535),
    "config_port": (1, 65535),
    "metrics_port": (1, 65535),
    "config_max_clients": (1, 4096),
    "config_login_timeout": (1, 3600),
    "config_idle_timeout": (1, 86_400),
    "config_max_login_failures": (1, 1000),
    "config_login_failures_per_minute": (1, 1_000_000),
    "metrics_max_clients": (1, 4096),
    "metrics_timeout": (1, 3600),
    "logging": (-(2**63), 2**63 - 1),  # 0 off, anything else on
    "max_message_size": (1024, 2**40),
    "max_data_memory": (1024, 2**40),
    "max_recipients": (1, 100_000),
    "max_command_line": (512, 65536),  # RFC 5321 forbids less than 512
    "max_text_line": (1000, 1 << 20),  # RFC 5321 forbids less than 1000
    "max_errors": (1, 100_000),
    "timeout": (1, 86_400),
    "data_timeout": (1, 86_400),
    "max_connections": (1, 1_000_000),
    "max_connections_per_ip": (0, 1_000_000),
    "min_free_space": (0, 2**60),
    "graceful_timeout": (0, 86_400),
    "max_requests": (0, 2**31),
    "backlog": (1, 65535),
    "delivery_threads": (1, 256),
}

def check_range(name: str, value: int) -> str | None:
    """None if ``value`` is allowed for ``name``, else the reason."""
    low, high = RANGES[name]
    if not low <= value <= high:
        return f"{name} must be between {low} and {high}"
    return None
