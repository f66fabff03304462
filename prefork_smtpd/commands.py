"""The SMTP verbs: one registry entry per verb, read by dispatch, HELP and EHLO.

Each handler carries its own description, as aiosmtpd's ``@syntax`` does:
the states it may run in, its syntax (the text of its 501 and of HELP),
the EHLO keyword it brings and when it is enabled. The session's dispatch,
its HELP reply and its EHLO keywords are all read from the one table, so
a verb cannot be advertised and refused, or answered and left out of HELP.

Adding a verb (STARTTLS, AUTH, BDAT...) to ``session.Session``:

1. a handler named after the verb, registered with its description::

       @COMMANDS.verb(
           states=COMMAND_STATES,                 # where it may run
           syntax="STARTTLS",                     # 501 5.5.4 Syntax: STARTTLS
           help="STARTTLS: encrypt the session",  # its line in HELP (optional)
           ehlo="STARTTLS",                       # its EHLO keyword, or a function of the session
           enabled=lambda s: s.tls_offered and not s.tls_active,  # else 502, not advertised
       )
       def smtp_STARTTLS(self, arg: str) -> Reply | None: ...

   It returns its one reply, or None once it has emitted its events
   itself (``self._out.append``, ``self._wait`` for an outside step).
   A verb listed in ``not_implemented`` gets its handler this way;
2. its 503s in ``SEQUENCE_ERRORS`` for the command states it may not run
   in (else the generic ``replies.BAD_SEQUENCE``), and its rows in the
   independent table of tests/test_session_sequence.py;
3. its reply texts in replies.py;
4. for an outside step (a handshake, a password check): a ``Wait`` event
   and its verdicts in events.py, a branch in the worker's event loop
   (``SMTPConnection._act``) that brings the verdict to ``resume``.

The verb is the name after ``smtp_``. ``not_implemented`` registers known
verbs without a handler (502 in every state); HELP lists the verbs in the
order their handlers registered, EHLO the keywords in the order declared.

The table knows nothing of the session's states: they are whatever the
session passes in ``states``. Which reply a verb gets in a state it may not
run in stays data in the session (``SEQUENCE_ERRORS``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Set
from dataclasses import dataclass
from typing import Any

from . import replies
from .events import Reply

Handler = Callable[[Any, str], "Reply | None"]
Condition = Callable[[Any], bool]  # of the session


@dataclass(frozen=True)
class Command:
    verb: str
    handler: Handler | None  # None: a known verb this server does not implement (502)
    states: frozenset  # the states it may run in
    syntax: str = ""  # how its arguments go, for the 501 reply: "MAIL FROM:<user@domain>"
    params: str = ""  # its optional parameters, named in the 501 for a bad one
    help: str = ""  # its line in HELP, if any
    enabled: Condition | None = None  # None: always

    def usage(self, status: str = "5.5.4", params: bool = False) -> Reply:
        """The 501 for arguments that do not parse (built once per variant)."""
        usage = f"{self.syntax} {self.params}" if params else self.syntax
        return replies.syntax_error(usage, status)


@dataclass(frozen=True)
class Extension:
    """An EHLO keyword: a verb's (HELP) or the session's (PIPELINING)."""

    keyword: str | Callable[[Any], str]
    enabled: Condition | None = None


class CommandTable(Mapping[str, Command]):
    """Verb -> Command, in the order registered (HELP lists them so)."""

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}
        self._extensions: list[Extension] = []  # in EHLO's order
        self._help_cache: dict[tuple[str, ...], Reply] = {}
        # The dispatch's lookup, at C speed (Mapping.get goes through __getitem__).
        self.lookup: Callable[[str], Command | None] = self._commands.get

    # ----------------------------------------------------------- registering
    def verb(
        self,
        *,
        states: Set[Any],
        syntax: str = "",
        params: str = "",
        help: str = "",
        ehlo: str | Callable[[Any], str] | None = None,
        enabled: Condition | None = None,
    ) -> Callable[[Handler], Handler]:
        """Register the decorated ``smtp_VERB`` as the handler of VERB."""

        def register(handler: Handler) -> Handler:
            prefix, _, verb = handler.__name__.partition("smtp_")
            if prefix or not verb or verb != verb.upper():
                raise ValueError(f"a command handler is named smtp_VERB, not {handler.__name__}")
            known = self._commands.get(verb)
            if known is not None and known.handler is not None:
                raise ValueError(f"{verb} has a handler already")
            self._commands.pop(verb, None)  # HELP lists verbs in the order their handlers came
            self._commands[verb] = Command(verb, handler, frozenset(states), syntax, params, help, enabled)
            if ehlo is not None:
                self._extensions.append(Extension(ehlo, enabled))
            self._help_cache.clear()
            return handler

        return register

    def not_implemented(self, *verbs: str, states: frozenset) -> None:
        """Known verbs without a handler: 502 in every state they may run in."""
        for verb in verbs:
            self._commands[verb] = Command(verb, None, frozenset(states))
        self._help_cache.clear()

    def extension(self, keyword: str | Callable[[Any], str], enabled: Condition | None = None) -> None:
        """An EHLO keyword that comes with no verb of its own (PIPELINING, SIZE...)."""
        self._extensions.append(Extension(keyword, enabled))

    def copy(self) -> CommandTable:
        """A table to extend without changing this one (a Session subclass's)."""
        table = CommandTable()
        table._commands.update(self._commands)
        table._extensions.extend(self._extensions)
        return table

    # --------------------------------------------------------------- reading
    def __getitem__(self, verb: str) -> Command:
        return self._commands[verb]

    def __iter__(self) -> Iterator[str]:
        return iter(self._commands)

    def __len__(self) -> int:
        return len(self._commands)

    def __contains__(self, verb: object) -> bool:
        return verb in self._commands

    @staticmethod
    def answers(command: Command, session: Any) -> bool:
        """Whether ``command`` runs for ``session`` now (else: 502)."""
        return command.handler is not None and (command.enabled is None or command.enabled(session))

    def ehlo_keywords(self, session: Any) -> list[str]:
        """The keywords EHLO advertises to ``session`` now, in registration order."""
        return [
            e.keyword if isinstance(e.keyword, str) else e.keyword(session)
            for e in self._extensions
            if e.enabled is None or e.enabled(session)
        ]

    def help_reply(self, session: Any) -> Reply:
        """HELP: the verbs that run for ``session`` now, and their details."""
        running = tuple(verb for verb, command in self._commands.items() if self.answers(command, session))
        reply = self._help_cache.get(running)
        if reply is None:
            details = [self._commands[verb].help for verb in running if self._commands[verb].help]
            lines = ["Commands: " + " ".join(running), *details, "End of HELP"]
            reply = self._help_cache[running] = replies.multiline(214, "2.0.0", lines)
        return reply
