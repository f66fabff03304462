"""The server's secrets from files: the TLS certificate and the users table.

The master reads them at start (a bad file stops the start, exit 2, with the
reason) and again on each reload; the workers it forks inherit them in
memory, so a file changed or broken later never reaches a running worker.
Turning TLS on or off takes a restart (the listeners' TLS modes are fixed
when they are bound); a reload swaps the certificate. On reload a bad new
file is not fatal: the old certificate (or users table)
stays in use and the reason is logged, so a renewal gone wrong never leaves
the server without TLS or its users locked out.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from . import users as users_module
from .settings import Settings
from .tls import TLSConfigError, TLSContextHolder
from .users import UsersFileError, UsersTable


class CredentialsError(Exception):
    """A file that cannot serve at start; the message is one line."""


@dataclass
class Credentials:
    tls: TLSContextHolder | None = None
    users: UsersTable | None = None

    @classmethod
    def load(cls, settings: Settings) -> tuple[Credentials, list[str]]:
        """The credentials the settings name, and lines for the log; raises CredentialsError."""
        notes: list[str] = []
        holder = None
        if settings.tls_cert is not None:
            try:
                holder = TLSContextHolder(settings.tls_cert, settings.tls_key)
            except TLSConfigError as exc:
                raise CredentialsError(f"TLS: {exc}") from None
            notes += _describe(holder)
        table = None
        if settings.users is not None:
            try:
                table = users_module.load_users(settings.users)
            except UsersFileError as exc:
                raise CredentialsError(f"users: {exc}") from None
            # One slow hash now, inherited by every worker: the first check
            # of an unknown name then costs what any check costs.
            users_module.warm_up()
            notes.append(f"users: {len(table)} from {settings.users}")
        return cls(holder, table), notes

    def reload(self, settings: Settings) -> list[str]:
        """Read the files again for the next generation of workers; lines for the log."""
        notes: list[str] = []
        if (settings.tls_cert is None) != (self.tls is None):
            # The listeners' TLS modes were fixed when they were bound.
            state = "off" if self.tls is None else "on"
            notes.append(f"TLS: turning TLS on or off takes a restart; it stays {state}")
        elif self.tls is not None:
            reason = self.tls.reload(settings.tls_cert, settings.tls_key)
            notes += [f"TLS: {reason}"] if reason else _describe(self.tls)
        if settings.users is None:
            self.users = None
        else:
            try:
                self.users = users_module.load_users(settings.users)
                notes.append(f"users: {len(self.users)} from {settings.users}")
            except UsersFileError as exc:
                if self.users is None:
                    notes.append(f"users: {exc}; AUTH stays off")
                else:
                    notes.append(f"users: {exc}; keeping the users loaded before")
        return notes

    @property
    def tls_context(self) -> ssl.SSLContext | None:
        return self.tls.context if self.tls is not None else None


def _describe(holder: TLSContextHolder) -> list[str]:
    info = holder.info
    lines = [f"TLS: certificate {info.certfile}, valid until {info.not_after:%Y-%m-%d %H:%M:%S} UTC"]
    return lines + [f"TLS warning: {w}" for w in info.warnings]
