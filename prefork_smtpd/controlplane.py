"""The master's control plane: the settings in force, where each value came
from, and how they change (live, or by a reload).

The config port (``control.ConfigSession``) and any later front end (an
HTTP API) ask it; it needs no process, socket or fork, only:

* a shared control block (``stats.SharedStats``, or anything with
  ``get(name)`` and ``set(name, value)``) where the live values are
  published for the workers, given by ``attach``;
* ``on_change``: what to do instead of writing the block for a setting whose
  change needs an action (``workers``: the master grows or shrinks the pool,
  and writes the block itself);
* ``reread``: builds fresh settings for a reload (config file, then the same
  flags on top), raising for a bad file.

What a value is and where it may be set comes from ``settings.REGISTRY``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Protocol

from .settings import NEEDS_RESTART, PARAMETERS, SHARED, Settings, check_range


class ControlBlock(Protocol):
    def get(self, name: str) -> int: ...

    def set(self, name: str, value: int) -> None: ...


def configured_values(settings: Any) -> dict[str, int]:
    """The live parameters' values as the config file and flags give them."""
    return {name: getattr(settings, name) for name in PARAMETERS}


class ControlPlane:
    def __init__(
        self,
        settings: Any,
        reread: Callable[[], Any] | None = None,
        log: Callable[[str], None] = lambda message: None,
        on_change: dict[str, Callable[[int], None]] | None = None,
    ) -> None:
        self.settings: Any = settings
        self.reread_settings = reread
        self.log = log
        self.on_change = dict(on_change or {})
        self.block: ControlBlock | None = None
        # The live parameters as the config file and flags last gave them,
        # and the names an operator changed on the config port since.
        self.configured = configured_values(settings)
        self.live: set[str] = set()

    def attach(self, block: ControlBlock) -> None:
        """Use this shared block from now on, and publish the settings in it."""
        self.block = block
        self.publish()

    def publish(self) -> None:
        """Write every shared setting into the control block for the workers."""
        assert self.block is not None
        for name in SHARED:
            self.block.set(name, getattr(self.settings, name))

    # ------------------------------------------------------ live changes
    def apply(self, name: str, value: int) -> str | None:
        """A change asked for on the config port: None once it is in force,
        else the reason it was refused (and nothing changed)."""
        if name not in PARAMETERS:
            return f"unknown parameter {name}"
        reason = check_range(name, value)
        if reason:
            return reason
        assert self.block is not None
        hook = self.on_change.get(name)
        if hook is not None:
            hook(value)
        else:
            self.block.set(name, value)
        setattr(self.settings, name, value)
        self.live.add(name)
        self.log(f"config: {name}={value}")
        return None

    def current_values(self) -> dict[str, int]:
        """Each live parameter's value in force now, in ``show`` order."""
        assert self.block is not None
        return {name: self.block.get(name) for name in PARAMETERS}

    def live_values(self) -> dict[str, tuple[int, str]]:
        """Each parameter's value now, and where it comes from (for ``show``)."""
        return {name: (value, self.source_of(name, value)) for name, value in self.current_values().items()}

    def source_of(self, name: str, value: int) -> str:
        # Changed on the port, or by a signal (TTIN/TTOU change workers): live.
        if name in self.live or value != self.configured[name]:
            return "live"
        return self.settings.sources.get(name, "default")

    # ----------------------------------------------------------- reload
    def reread(self) -> Settings:
        """Fresh settings for a reload; raises for a bad file. Nothing changes yet."""
        if self.reread_settings is not None:
            return self.reread_settings()
        return replace(self.settings, **self.configured)

    def adopt(self, fresh: Any) -> None:
        """Put reloaded settings in force: restart-only values stay as they
        are, live changes stay unless the file changed that key; then publish."""
        for name in NEEDS_RESTART:
            if getattr(fresh, name) != getattr(self.settings, name):
                self.log(f"reload: {name} changes only on restart; kept {getattr(self.settings, name)!r}")
                setattr(fresh, name, getattr(self.settings, name))
        self.keep_live_values(fresh)
        self.settings = fresh
        self.publish()

    def keep_live_values(self, fresh: Any) -> None:
        """On reload: a live value stays unless the file (or a flag) changed that key.

        The new configured value is compared with the one last read, not with
        the live one: a key the operator did not touch in the file leaves the
        live change in force; a key they did change there wins.
        """
        current = self.current_values()
        configured = configured_values(fresh)
        for name in PARAMETERS:
            if self.source_of(name, current[name]) != "live":
                continue
            if configured[name] != self.configured[name]:
                self.live.discard(name)
                self.log(f"reload: {name}={configured[name]} from the config replaces the live {current[name]}")
            else:
                setattr(fresh, name, current[name])
                self.live.add(name)
        self.configured = configured
