"""Per-invocation settings shared by every command: the controller address, output format, client."""

from __future__ import annotations

from dataclasses import dataclass, field

import typer

from clonebox_cli.client import ControllerClient
from clonebox_cli.output import OutputFormat

#: used when neither --controller, CLONEBOX_CONTROLLER nor a `clonebox dev up` state names one
DEFAULT_CONTROLLER = "127.0.0.1:7100"


@dataclass
class Settings:
    """What the global options decided; the root callback stores it in ``ctx.obj``."""

    controller: str
    output: OutputFormat = OutputFormat.table
    _client: ControllerClient | None = field(default=None, repr=False)

    @property
    def json(self) -> bool:
        """True for ``--output json``."""
        return self.output is OutputFormat.json

    def client(self) -> ControllerClient:
        """Return the controller client (one channel per invocation, made on first use)."""
        if self._client is None:
            self._client = ControllerClient(self.controller)
        return self._client

    def close(self) -> None:
        """Close the client's channel, if one was opened."""
        if self._client is not None:
            self._client.close()
            self._client = None


def settings(ctx: typer.Context) -> Settings:
    """Return the Settings of this invocation (set by the root callback)."""
    found = ctx.find_object(Settings)
    if found is None:  # a command invoked without the root app (only in tests of single commands)
        found = Settings(DEFAULT_CONTROLLER)
        ctx.obj = found
    return found
