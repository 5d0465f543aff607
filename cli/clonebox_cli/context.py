"""Per-invocation settings shared by every command: controller address, TLS folder, output format, client."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import typer

from clonebox_cli import credentials
from clonebox_cli.client import ControllerClient
from clonebox_cli.output import OutputFormat
from clonebox_core.errors import CloneboxError, Unavailable
from clonebox_core.rpc.server import Transport

#: used when neither --controller, CLONEBOX_CONTROLLER nor a `clonebox dev up` state names one
DEFAULT_CONTROLLER = "127.0.0.1:7100"
#: a renewal must not hold up the command for long
_RENEW_TIMEOUT = 10.0


@dataclass
class Settings:
    """What the global options decided; the root callback stores it in ``ctx.obj``."""

    controller: str
    output: OutputFormat = OutputFormat.table
    #: folder with ca.crt, user.crt, user.key ("" means the default folder)
    tls_dir: str = ""
    #: plaintext gRPC (loopback only)
    insecure: bool = False
    _client: ControllerClient | None = field(default=None, repr=False)

    @property
    def json(self) -> bool:
        """True for ``--output json``."""
        return self.output is OutputFormat.json

    def transport(self) -> Transport:
        """MTLS with the files in ``tls_dir`` (checked, with the fix in the error), or plaintext."""
        return credentials.load_transport(self.tls_dir or str(credentials.default_tls_dir()), self.insecure)

    def client(self) -> ControllerClient:
        """
        Return the controller client (one channel per invocation, made on first use).

        Every command that talks to the controller comes here first, so this is where a certificate past
        two thirds of its lifetime is renewed; a failed renewal is a warning while the old one is valid.
        """
        if self._client is None:
            client = ControllerClient(self.controller, self.transport())
            self._renew(client)
            self._client = client
        return self._client

    def _renew(self, client: ControllerClient) -> None:
        tls = client.transport.tls
        if tls is None:
            return
        try:
            cert = credentials.renew(
                tls,
                lambda request: client.call(client.pki.RenewCertificate, request, timeout=_RENEW_TIMEOUT, attempts=1),
            )
        except Unavailable:
            return  # unreachable, or a failed handshake: the command's own call reports it in a moment
        except (CloneboxError, OSError, ValueError) as exc:
            until = tls.certificate().not_valid_after_utc.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
            message = exc.message if isinstance(exc, CloneboxError) else str(exc)
            typer.echo(
                f"warning: could not renew the client certificate in {tls.cert.parent} (valid until {until}): "
                f"{' '.join(message.split())}",
                err=True,
            )
            return
        finally:
            client.close()  # the command dials again, with the new pair when there is one
        if cert is not None:
            until = cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC")
            typer.echo(f"renewed the client certificate in {tls.cert.parent} (valid until {until})", err=True)

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
