"""
``clonebox``: the fleet CLI, a client of the controller only.

One typer app with a command group per module (``host``, ``vm``, ``operation``, ``pki``, ``dev``). The
root command class catches every CloneboxError a command raises and hands it to ``clonebox_cli.errors``,
the one place that prints errors and picks exit codes; ``run()`` is the console-script entry point.

Global options: ``--controller`` (where), ``--tls-dir`` (this client's certificate, see
``clonebox_cli.credentials``), ``--insecure`` (plaintext, loopback only) and ``--output``.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from clonebox_cli import credentials, dev, errors, host, operation, pki, vm
from clonebox_cli.context import DEFAULT_CONTROLLER, Settings
from clonebox_cli.output import OutputFormat
from clonebox_core.errors import CloneboxError


class _RootGroup(TyperGroup):
    """Maps errors escaping any subcommand to a one-line message and an exit code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except CloneboxError as err:
            raise typer.Exit(errors.report(err)) from None
        except (typer.Exit, typer.Abort, typer.TyperException, KeyboardInterrupt):
            raise  # typer's own control flow: usage errors (2), --help, Ctrl-C (130)
        except Exception as exc:
            raise typer.Exit(errors.report_unexpected(exc)) from None


app = typer.Typer(
    cls=_RootGroup,
    name="clonebox",
    help="CloneBox fleet: create and manage libvirt/QEMU VMs through the controller.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(host.app, name="host")
app.add_typer(vm.app, name="vm")
app.add_typer(operation.app, name="operation")
app.add_typer(pki.app, name="pki")
app.add_typer(dev.app, name="dev")


def _default_tls_dir(dev_controller: bool) -> str:
    """The dev user's folder (made by 'dev up'), unless another controller is asked for and ours exists."""
    own, made_by_dev = credentials.default_tls_dir(), dev.recorded_tls_dir()
    if made_by_dev and (dev_controller or not credentials.user_files(own).exists()):
        return made_by_dev
    return str(own)


def _version(value: bool) -> None:
    if value:
        try:
            version = metadata.version("clonebox")
        except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
            version = "unknown"
        typer.echo(f"clonebox {version}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    controller: Annotated[
        str | None,
        typer.Option(
            "--controller",
            envvar="CLONEBOX_CONTROLLER",
            metavar="HOST:PORT",
            help=f"Controller address \\[default: recorded by 'clonebox dev up', else {DEFAULT_CONTROLLER}]",
            show_default=False,
        ),
    ] = None,
    tls_dir: Annotated[
        str | None,
        typer.Option(
            "--tls-dir",
            envvar="CLONEBOX_TLS_DIR",
            metavar="DIR",
            help="Folder with this client's ca.crt, user.crt and user.key "
            "\\[default: the one 'clonebox dev up' made when talking to its controller, else "
            "$XDG_CONFIG_HOME/clonebox/tls]",
            show_default=False,
        ),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            envvar="CLONEBOX_INSECURE",
            help="Plaintext gRPC without certificates; only to a loopback controller that runs with insecure: true.",
        ),
    ] = False,
    output: Annotated[
        OutputFormat, typer.Option("--output", "-o", help="table for people, json for programs.")
    ] = OutputFormat.table,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """CloneBox fleet CLI."""
    recorded = dev.recorded_controller()
    address = controller or recorded or DEFAULT_CONTROLLER
    if not tls_dir and not insecure and address == recorded and dev.recorded_insecure():
        insecure = True  # the local fleet was started with 'clonebox dev up --insecure'
    folder = tls_dir or _default_tls_dir(address == recorded)
    ctx.obj = Settings(controller=address, output=output, tls_dir=folder, insecure=insecure)
    ctx.call_on_close(ctx.obj.close)


def run() -> None:
    """Console-script entry point: never a traceback, always a meaningful exit code."""
    try:
        app(prog_name="clonebox")
    except KeyboardInterrupt:
        sys.exit(errors.EXIT_INTERRUPTED)
    except BrokenPipeError:
        # `clonebox vm list | head`: the reader went away; stay quiet like other Unix tools
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(141)
    except CloneboxError as err:  # raised outside a command (option callbacks)
        sys.exit(errors.report(err))
    except Exception as exc:
        sys.exit(errors.report_unexpected(exc))


if __name__ == "__main__":  # pragma: no cover
    run()
