"""systemd's notify protocol (sd_notify), with the standard library.

Datagrams of ``KEY=VALUE`` lines to the socket named by ``NOTIFY_SOCKET``
(a path, or ``@name`` for the abstract namespace). Without that variable
(not under systemd) every call does nothing.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.sock: socket.socket | None = None
        if self.address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # The watchdog is ours only if WATCHDOG_PID is unset or names us.
        usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        mine = not watchdog_pid or watchdog_pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 1e6 / 2 if usec.isdigit() and int(usec) > 0 and mine else None
        self.next_watchdog = 0.0

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def send(self, **fields: str | int) -> None:
        if self.sock is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            self.sock.sendto(message.encode(), self.address)
        except OSError:
            pass  # systemd gone or busy: nothing useful to do about it

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status)

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd tell this reload from an older one.
        self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> None:
        self.send(STOPPING=1)

    def status(self, text: str) -> None:
        self.send(STATUS=text)

    def watchdog_due(self, now: float) -> float | None:
        """Seconds until the next watchdog ping, pinging now if it is due."""
        if self.watchdog_interval is None:
            return None
        if now >= self.next_watchdog:
            self.send(WATCHDOG=1)
            self.next_watchdog = now + self.watchdog_interval
        return self.next_watchdog - now

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
